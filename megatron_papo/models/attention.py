"""PyTorch ``scaled_dot_product_attention`` as megatron-core's core-attention submodule.

A drop-in for ``DotProductAttention`` in a layer spec when transformer-engine is absent: on GPU it runs
the flash / memory-efficient kernels instead of megatron-core's unfused softmax(QK^T)V, which
materialises ``[b, heads, s, s]`` in float32. Masks follow megatron-core: ``attention_mask`` is boolean,
True where attention is NOT allowed, broadcastable to ``[b, 1, s_q, s_k]``. Packed sequences
(``PackedSeqParams``, format ``thd``: query / key / value ``[t, heads/tp, d]``) attend causally within
each segment of ``cu_seqlens``, one SDPA call per segment: exact, and no ``[t, t]`` mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

MASK_TYPES = (AttnMaskType.causal, AttnMaskType.no_mask, AttnMaskType.padding, AttnMaskType.arbitrary)


class SDPAttention(MegatronModule):
    """query [s_q, b, heads/tp, d], key / value [s_k, b, groups/tp, d] -> [s_q, b, heads/tp * d].

    ``causal``: causal attention (an ``attention_mask`` given anyway replaces the causal mask, as in
    megatron-core's softmax); ``no_mask``: full attention; ``padding`` / ``arbitrary``: the given
    ``attention_mask`` (required). A query row with every key masked (padding) attends to every key
    instead of turning into NaN. Grouped-query attention is native.
    """

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
        if attn_mask_type not in MASK_TYPES:
            raise ValueError(f"SDPAttention supports attention mask types {MASK_TYPES}, got {attn_mask_type}")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention takes no attention_bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        mask_type = attn_mask_type or self.attn_mask_type
        s, b, heads, d = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        allowed = None
        if attention_mask is not None and mask_type != AttnMaskType.no_mask:
            allowed = ~attention_mask.bool().expand(b, 1, s, key.shape[0])
            allowed = allowed | ~allowed.any(-1, keepdim=True)  # fully masked rows: finite, not NaN
        elif mask_type in (AttnMaskType.padding, AttnMaskType.arbitrary):
            raise ValueError(f"attn_mask_type {mask_type} needs an attention_mask")
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=allowed is None and mask_type == AttnMaskType.causal,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != heads,
        )
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)

    def _packed(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: PackedSeqParams
    ) -> torch.Tensor:
        """query [t, heads/tp, d], key / value [t, groups/tp, d] -> [t, heads/tp * d], causal attention
        inside each segment of ``params.cu_seqlens_q`` (the same for keys: self-attention)."""
        if params.qkv_format != "thd" or not torch.equal(params.cu_seqlens_q, params.cu_seqlens_kv):
            raise NotImplementedError("SDPAttention packs self-attention in the thd format only")
        t, heads, d = query.shape
        bounds = params.cu_seqlens_q.tolist()
        q, k, v = (x.transpose(0, 1) for x in (query, key, value))  # [heads, t, d]
        out = [
            F.scaled_dot_product_attention(
                q[:, start:end],
                k[:, start:end],
                v[:, start:end],
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=True,
                scale=self.softmax_scale,
                enable_gqa=k.shape[0] != heads,
            )
            for start, end in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return torch.cat(out, dim=1).transpose(0, 1).reshape(t, heads * d)
