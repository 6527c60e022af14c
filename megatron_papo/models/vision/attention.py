"""The vision tower's core attention: bidirectional softmax attention within windows or whole images."""

from __future__ import annotations

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_papo.models.vision.segments import VisionSegments


class VisionCoreAttention(MegatronModule):
    """megatron-core's core-attention submodule for the vision blocks.

    query / key / value [patches, 1, heads/tp, d] -> [patches, 1, heads/tp * d]. Block ``layer_number``
    (1-based) attends within whole images when ``layer_number - 1`` is in ``full_attention_layers`` (the
    HF config's ``fullatt_block_indexes``), else within windows; the segments come from the
    ``VisionSegments`` passed as ``packed_seq_params``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        full_attention_layers: frozenset[int],
        softmax_scale: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(config)
        if attn_mask_type != AttnMaskType.no_mask:
            raise ValueError(f"the vision tower attends bidirectionally, got attn_mask_type {attn_mask_type}")
        self.full_attention = layer_number - 1 in full_attention_layers
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: VisionSegments | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if not isinstance(packed_seq_params, VisionSegments):
            raise TypeError("VisionCoreAttention needs the VisionSegments of the batch as packed_seq_params")
        segments = packed_seq_params.images if self.full_attention else packed_seq_params.windows
        n, b, heads, dim = query.shape
        out = segments.attend(*(t.squeeze(1) for t in (query, key, value)), scale=self.softmax_scale)
        return out.reshape(n, b, heads * dim)
