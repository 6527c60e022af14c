"""Qwen3-VL's learned position embeddings: a square grid of them resampled to each image's patch grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.vision_utils import get_vision_interpolation_indices_and_weights


class InterpolatedPositionEmbedding(torch.nn.Module):
    """grid_thw [images, 3] -> [patches, hidden]: the ``side x side`` table of learned embeddings
    (``weight`` [side**2, hidden], replicated over TP), bilinearly interpolated with aligned corners to each
    image's ``h x w`` patch grid, patches in spatial-merge-block order (the order of ``pixel_values``):
    transformers' ``Qwen3VLVisionModel.pos_embed`` and its interpolation, with its own gather indices and
    weights (``get_vision_interpolation_indices_and_weights``)."""

    def __init__(self, num_embeddings: int, hidden_size: int, merge_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.side = int(num_embeddings**0.5)
        self.merge_size = merge_size
        self.weight = torch.nn.Parameter(torch.empty(num_embeddings, hidden_size, dtype=dtype))
        torch.nn.init.normal_(self.weight, std=0.02)

    def forward(self, grid_thw: torch.Tensor) -> torch.Tensor:
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid_thw,
            num_grid_per_side=self.side,
            mode="bilinear",
            align_corners=True,
            spatial_merge_size=self.merge_size,
        )
        device = self.weight.device
        taps = F.embedding(indices.to(device), self.weight)  # [patches, 4, hidden]
        return (taps * weights.to(device)[:, :, None]).sum(1)
