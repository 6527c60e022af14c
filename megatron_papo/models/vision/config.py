"""The vision tower's megatron-core ``TransformerConfig``, built from an HF
``Qwen2_5_VLVisionConfig`` (RMSNorm, SwiGLU MLP) or ``Qwen3VLVisionConfig`` (LayerNorm, plain MLP)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.transformer import TransformerConfig

NORM_EPS = 1e-6  # transformers hard-codes this epsilon for every norm of the vision tower
QWEN3_VISION = "qwen3_vl_vision"  # the model_type of Qwen3-VL's vision config
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


def vision_transformer_config(hf_vision, *, params_dtype: torch.dtype) -> TransformerConfig:
    """The vision blocks' config at the current TP size (heads and MLP columns split over TP): Qwen2.5-VL's
    RMSNorm and gated MLP, or Qwen3-VL's LayerNorm and plain MLP.

    The tower lives whole on the first pipeline stage, so its config has pipeline size 1 whatever the
    LM's layout is. Raises ``ValueError`` when TP does not divide the heads, MLP width or merger width.
    """
    if hf_vision.hidden_act not in ACTIVATIONS:
        raise ValueError(
            f"vision_config.hidden_act {hf_vision.hidden_act!r} is not one of {list(ACTIVATIONS)}"
        )
    tp = ps.get_tensor_model_parallel_world_size()
    merger_width = hf_vision.hidden_size * hf_vision.spatial_merge_size**2
    for what, count in (
        ("vision attention heads (vision_config.num_heads)", hf_vision.num_heads),
        ("vision MLP width (vision_config.intermediate_size)", hf_vision.intermediate_size),
        ("patch merger width (hidden_size * spatial_merge_size**2)", merger_width),
    ):
        if count % tp:
            raise ValueError(f"tensor_model_parallel_size {tp} does not divide the {count} {what}")
    qwen3 = hf_vision.model_type == QWEN3_VISION
    return TransformerConfig(
        num_layers=hf_vision.depth,
        hidden_size=hf_vision.hidden_size,
        ffn_hidden_size=hf_vision.intermediate_size,
        num_attention_heads=hf_vision.num_heads,
        kv_channels=hf_vision.hidden_size // hf_vision.num_heads,
        normalization="LayerNorm" if qwen3 else "RMSNorm",
        layernorm_epsilon=NORM_EPS,
        gated_linear_unit=not qwen3,
        activation_func=ACTIVATIONS[hf_vision.hidden_act],
        add_bias_linear=True,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
