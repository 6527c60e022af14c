"""The ``model`` section and the megatron-core ``TransformerConfig`` built from an HF Qwen2.5-VL or Qwen3-VL
config."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.transformer import TransformerConfig
from transformers import AutoConfig

from megatron_papo.config_io import check_choices

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the HF config's model_type values megatron-papo builds, and the architecture each names
MODEL_TYPES = {"qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}


@dataclass
class ModelConfig:
    """``hf_path``: an HF Qwen2.5-VL or Qwen3-VL directory (config, weights, tokenizer, image processor).

    ``attention``: ``auto`` (transformer-engine when importable and on GPU, else PyTorch SDPA), ``sdpa``,
    ``te``, ``local`` (megatron-core's unfused attention). ``recompute``: activation recomputation of
    whole LM layers (granularity ``full``, one layer at a time). ``sequence_parallel``: megatron-core's
    sequence parallelism of the LM's norms and dropouts over the TP group (sequence length divisible by TP).
    """

    hf_path: str = "runs/tiny-qwen25vl"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention: Literal["auto", "sdpa", "local", "te"] = "auto"
    recompute: bool = False
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        check_choices(self, "model")
        if not self.hf_path.strip():
            raise ValueError("model.hf_path must name an HF Qwen2.5-VL or Qwen3-VL directory")


def check_model_type(path: str, model_type: str | None) -> None:
    """Raise ``ValueError`` naming the model type of ``path`` unless it is one of ``MODEL_TYPES``."""
    if model_type not in MODEL_TYPES:
        supported = ", ".join(MODEL_TYPES)
        raise ValueError(f"{path} holds a {model_type!r} model; megatron-papo supports {supported}")


def load_hf_config(path: str):
    """The HF config at ``path``; a clear error when it is missing or not one of ``MODEL_TYPES``."""
    if not os.path.isdir(path):
        raise ValueError(f"model.hf_path {path}: no such directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"model.hf_path {path}: no config.json (make one with tools/make_tiny_model.py or "
            "point to a downloaded Qwen2.5-VL or Qwen3-VL directory)"
        )
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        check_model_type(path, json.load(f).get("model_type"))
    return AutoConfig.from_pretrained(path)


def check_layout(hf_config, tp: int, pp: int) -> None:
    """Raise ``ValueError`` naming the model count that the TP or PP size does not divide."""
    text, vision = hf_config.get_text_config(), hf_config.vision_config
    for what, count in (
        ("attention heads", text.num_attention_heads),
        ("KV heads", text.num_key_value_heads),
        ("vocabulary entries", text.vocab_size),
        ("vision attention heads", vision.num_heads),
    ):
        if count % tp:
            raise ValueError(f"tensor_model_parallel_size {tp} does not divide the model's {count} {what}")
    if text.num_hidden_layers % pp:
        raise ValueError(f"pipeline_model_parallel_size {pp} does not divide {text.num_hidden_layers} layers")


def deepstack_layers(hf_config) -> int:
    """How many of the first LM layers get DeepStack features added (Qwen3-VL), 0 for Qwen2.5-VL."""
    return len(getattr(hf_config.vision_config, "deepstack_visual_indexes", ()))


def language_config(cfg: ModelConfig, hf_config) -> TransformerConfig:
    """The LM decoder's megatron-core config at the current TP / PP sizes (the vision tower's is
    ``megatron_papo.models.vision.config.vision_transformer_config``). Raises ``ValueError`` naming the
    count that TP or PP does not divide."""
    text = hf_config.get_text_config()
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    check_layout(hf_config, tp, pp)
    dtype = DTYPES[cfg.dtype]
    rope = text.rope_parameters
    qwen3 = hf_config.model_type == "qwen3_vl"
    config = TransformerConfig(
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        ffn_hidden_size=text.intermediate_size,
        num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_key_value_heads,
        kv_channels=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=text.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=text.attention_bias if qwen3 else True,
        qk_layernorm=qwen3,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        sequence_parallel=cfg.sequence_parallel and tp > 1,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        recompute_granularity="full" if cfg.recompute else None,
        recompute_method="uniform" if cfg.recompute else None,
        recompute_num_layers=1 if cfg.recompute else None,
    )
    config.mrope_section = list(rope["mrope_section"])
    # pipeline stages exchange activation shapes: packed micro-batches differ in length, and a stage
    # boundary inside the DeepStack layers (Qwen3-VL) sends hidden states widened by the pending maps (set
    # after __post_init__, which refuses the flag with its default MoE token dispatcher, though there are
    # no experts)
    config.variable_seq_lengths = pp > 1
    return config
