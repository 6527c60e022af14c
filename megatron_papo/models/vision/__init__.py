"""The Qwen2.5-VL vision tower on megatron-core, tensor-parallel, matched to transformers 5's
``Qwen2_5_VisionTransformerPretrainedModel``.

Interface (composed by ``megatron_papo.models.qwen25vl`` on the first pipeline stage):

- ``build_vision_encoder(hf_vision_config, lm_hidden_size, *, params_dtype, attention_backend="sdpa")
  -> Qwen25VisionEncoder``: this TP rank's shard (TP from megatron's parallel state).
- ``Qwen25VisionEncoder.forward(pixel_values [patches, 3*2*14*14], grid_thw [images, 3])
  -> [patches / 4, lm_hidden_size]``: merged image tokens, in the order of transformers' ``visual(...)``.
- ``load_hf_vision_weights(encoder, hf_tensors, prefix)``: this rank's shard from full HF tensors.
- ``export_hf_vision_weights(encoder, prefix) -> Iterator[(hf_name, full tensor)]``: gathered over TP.
- ``encoder.sharded_state_dict()``: megatron-core ``dist_checkpointing`` across TP sizes.

Modules: ``config`` (the vision ``TransformerConfig``), ``patch_embed``, ``rotary`` (2D rotary),
``segments`` (windows / images as variable-length attention segments), ``attention`` (the core
attention), ``layer_spec`` (the block as a ``TransformerLayer``), ``merger`` (2x2 patch merger),
``encoder``, ``weights`` (HF mapping).
"""

from megatron_papo.models.vision.encoder import Qwen25VisionEncoder, build_vision_encoder
from megatron_papo.models.vision.weights import export_hf_vision_weights, load_hf_vision_weights

__all__ = [
    "Qwen25VisionEncoder",
    "build_vision_encoder",
    "export_hf_vision_weights",
    "load_hf_vision_weights",
]
