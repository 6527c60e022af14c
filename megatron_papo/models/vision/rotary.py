"""The vision tower's 2D rotary embedding, in the angle layout megatron-core's ``apply_rotary_pos_emb``
takes (non-interleaved halves, as transformers' ``rotate_half``)."""

from __future__ import annotations

import torch


class VisionRotaryEmbedding(torch.nn.Module):
    """positions [patches, 2] (row h, column w) -> angles [patches, 1, 1, head_dim].

    As transformers' ``Qwen2_5_VLVisionRotaryEmbedding``: ``head_dim / 4`` frequencies
    ``theta ** (-2i / (head_dim / 2))``; the angles of a patch are ``[h * f, w * f]``, repeated for the
    two rotated halves, so rotation covers the whole head.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        half = head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        angles = (positions[..., None].float() * self.inv_freq).flatten(1)  # [patches, head_dim / 2]
        return torch.cat([angles, angles], dim=-1)[:, None, None, :]
