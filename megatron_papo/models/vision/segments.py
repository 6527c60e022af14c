"""Variable-length attention segments (windows or images) of the vision tower's patch sequence.

Each segment is a contiguous run of patches that attend only to each other (transformers' ``cu_seqlens``
/ ``cu_window_seqlens``). Segments of equal length are batched together, so attention runs as a few
dense ``scaled_dot_product_attention`` calls without any mask (flash kernels on GPU) instead of one
call per segment or one ``[patches, patches]`` block-diagonal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass(frozen=True)
class Segments:
    """``order`` [patches]: patch indices with equal-length segments adjacent; ``restore``: its inverse;
    ``groups``: ``(segment count, segment length)`` of each run of ``order``."""

    order: torch.Tensor
    restore: torch.Tensor
    groups: tuple[tuple[int, int], ...]

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, device: torch.device) -> Segments:
        """Segments bounded by ``cu_seqlens`` [segments + 1] (empty segments are dropped)."""
        cu = cu_seqlens.detach().to("cpu", torch.long)
        starts, lengths = cu[:-1], cu[1:] - cu[:-1]
        keep = torch.argsort(lengths, stable=True)
        keep = keep[lengths[keep] > 0]
        starts, lengths = starts[keep], lengths[keep]
        first = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        order = torch.repeat_interleave(starts, lengths) + torch.arange(int(lengths.sum())) - first
        length_values, counts = torch.unique_consecutive(lengths, return_counts=True)
        restore = torch.empty_like(order)
        restore[order] = torch.arange(order.numel())
        return cls(
            order.to(device),
            restore.to(device),
            tuple(zip(counts.tolist(), length_values.tolist(), strict=True)),
        )

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
    ) -> torch.Tensor:
        """Softmax attention within each segment: [patches, heads, d] x 3 -> [patches, heads, d]."""
        heads, dim = query.shape[1:]
        query, key, value = (t[self.order] for t in (query, key, value))
        outputs, start = [], 0
        for count, length in self.groups:
            q, k, v = (
                t[start : start + count * length].view(count, length, heads, dim).transpose(1, 2)
                for t in (query, key, value)
            )
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # [count, heads, length, d]
            outputs.append(out.transpose(1, 2).reshape(count * length, heads, dim))
            start += count * length
        return torch.cat(outputs)[self.restore]


@dataclass
class VisionSegments(PackedSeqParams):
    """What the vision tower passes through megatron-core's ``TransformerBlock`` as ``packed_seq_params``:
    the window segments (most blocks) and the per-image segments (``fullatt_block_indexes`` blocks).

    The tensors stay in ``sbhd`` layout ([patches, 1, ...]); megatron-core hands this object untouched to
    the core attention (``VisionCoreAttention``), which picks the segments of its block.
    """

    windows: Segments | None = None
    images: Segments | None = None

    def __post_init__(self) -> None:
        self.qkv_format = "sbhd"
