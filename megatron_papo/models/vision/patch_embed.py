"""The 3D patch embedding: transformers' ``Conv3d`` with stride == kernel, as the linear map it is."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class PatchEmbed(torch.nn.Module):
    """pixel_values [patches, channels * temporal * patch * patch] -> [patches, hidden].

    Each row of ``pixel_values`` is one flattened ``(channels, temporal, patch, patch)`` patch, so the
    convolution's output is ``weight.view(hidden, -1) @ row (+ bias)``: ``weight`` [hidden, patch_dim] is
    the conv kernel flattened in the same order, ``kernel`` its shape per output. ``bias``: Qwen3-VL's
    convolution has one, Qwen2.5-VL's not. Replicated over TP.
    """

    def __init__(
        self, kernel: tuple[int, int, int, int], hidden_size: int, dtype: torch.dtype, bias: bool = False
    ) -> None:
        super().__init__()
        self.kernel = kernel  # (channels, temporal, patch, patch): the Conv3d kernel's shape per output
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, math.prod(kernel), dtype=dtype))
        torch.nn.init.normal_(self.weight, std=0.02)
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype)) if bias else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.linear(pixel_values.to(self.weight.dtype), self.weight, self.bias)
