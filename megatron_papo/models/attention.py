"""PyTorch ``scaled_dot_product_attention`` as megatron-core's core-attention submodule.

A drop-in for ``DotProductAttention`` in a layer spec when transformer-engine is absent: on GPU it runs
the flash / memory-efficient kernels instead of megatron-core's unfused softmax(QK^T)V, which
materialises ``[b, heads, s, s]``. Causal masking only: the policy's sequences are right-padded, so a
causal mask already keeps real tokens from attending to padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """query [s, b, heads/tp, d], key / value [s, b, groups/tp, d] -> [s, b, heads/tp * d]."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention supports causal attention only, got {attn_mask_type}")
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
        **kwargs,
    ) -> torch.Tensor:
        s, b, heads, d = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=k.shape[1] != heads
        )
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)
