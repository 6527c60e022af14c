"""The vision block as a megatron-core ``TransformerLayer`` spec.

RMSNorm -> self-attention (fused QKV column-parallel with bias, 2D rotary, ``VisionCoreAttention``,
output row-parallel with bias) -> residual -> RMSNorm -> SwiGLU MLP with bias (gate and up fused into
``linear_fc1``) -> residual: transformers' ``Qwen2_5_VLVisionBlock``; with the config's LayerNorm and plain
MLP (``gated_linear_unit=False``), Qwen3-VL's ``Qwen3VLVisionBlock``.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_papo.models.vision.attention import VisionCoreAttention


def vision_layer_spec(full_attention_layers: Iterable[int]) -> ModuleSpec:
    """megatron-core's local layer spec with bidirectional segment attention (0-based full-attention
    block indexes)."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    attention = spec.submodules.self_attention
    attention.params = {"attn_mask_type": AttnMaskType.no_mask}
    attention.submodules.core_attention = partial(
        VisionCoreAttention, full_attention_layers=frozenset(full_attention_layers)
    )
    return spec
