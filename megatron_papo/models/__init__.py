"""The Qwen2.5-VL and Qwen3-VL policies on megatron-core.

- ``config``: ``ModelConfig`` (the ``model`` section) and the megatron ``TransformerConfig`` from HF.
- ``attention``: PyTorch SDPA as megatron-core's core attention.
- ``vision``: the tensor-parallel vision tower (package).
- ``image_tokens``: checking image placeholders against image grids.
- ``qwen25vl``: ``Qwen25VLModel`` (vision + ``GPTModel``), the stage both architectures share.
- ``qwen3vl``: ``Qwen3VLModel``; its differences in ``mrope`` (interleaved M-RoPE) and ``deepstack``.
- ``build``: ``build_model``, the model of the HF config's ``model_type``.
- ``rope_index``: multimodal RoPE positions (transformers' ``get_rope_index``).
- ``weights``: HF <-> megatron shards (``load_hf_weights``, ``export_stream``, ``export_hf_state_dict``).
- ``layouts``: where HF tensor rows lie in a parameter's TP shard (loading and export read it).
- ``weight_stream``: an export as row pieces, relayed between pipeline stages.
- ``safetensors_writer``: safetensors shards written piece by piece, within a buffer.
- ``hf_directory``: writing a complete HF directory from a (sharded) model.
- ``buckets``: size-bounded buckets of (name, tensor) pairs (safetensors shards, vLLM broadcast).
- ``tiny``: tiny random Qwen2.5-VL / Qwen3-VL models for tests and the CPU demo.
"""

from megatron_papo.models.build import build_model
from megatron_papo.models.config import ModelConfig
from megatron_papo.models.hf_directory import save_hf_directory
from megatron_papo.models.image_tokens import check_image_tokens
from megatron_papo.models.qwen3vl import Qwen3VLModel
from megatron_papo.models.qwen25vl import Qwen25VLModel
from megatron_papo.models.rope_index import mrope_position_ids
from megatron_papo.models.weights import export_hf_state_dict, load_hf_weights

__all__ = [
    "ModelConfig",
    "Qwen25VLModel",
    "Qwen3VLModel",
    "build_model",
    "check_image_tokens",
    "export_hf_state_dict",
    "load_hf_weights",
    "mrope_position_ids",
    "save_hf_directory",
]
