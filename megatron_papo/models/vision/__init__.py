"""The Qwen2.5-VL and Qwen3-VL vision towers on megatron-core, tensor-parallel, matched to transformers 5's
``Qwen2_5_VisionTransformerPretrainedModel`` and ``Qwen3VLVisionModel``.

Interface (composed by ``megatron_papo.models.qwen25vl`` on the first pipeline stage):

- ``build_vision_encoder(hf_vision_config, lm_hidden_size, *, params_dtype, attention_backend="sdpa")
  -> Qwen25VisionEncoder | Qwen3VisionEncoder``: this TP rank's shard (TP from megatron's parallel state),
  by the vision config's ``model_type``.
- ``Qwen25VisionEncoder.forward(pixel_values [patches, 3*2*14*14], grid_thw [images, 3])
  -> [patches / 4, lm_hidden_size]``: merged image tokens, in the order of transformers' ``visual(...)``.
- ``Qwen3VisionEncoder.forward(pixel_values [patches, 3*2*16*16], grid_thw [images, 3])
  -> ([patches / 4, lm_hidden_size], DeepStack features: a list of such tensors)``.
- ``load_hf_vision_weights(encoder, hf_tensors, prefix)``: this rank's shard from full HF tensors.
- ``export_hf_vision_weights(encoder, prefix) -> Iterator[(hf_name, full tensor)]``: gathered over TP.
- ``encoder.sharded_state_dict()``: megatron-core ``dist_checkpointing`` across TP sizes.

Modules: ``config`` (the vision ``TransformerConfig``), ``inputs`` (checking pixel values against
grids), ``patch_embed``, ``position_grid`` (Qwen3-VL's interpolated learned positions), ``rotary`` (2D
rotary), ``segments`` (windows / images as variable-length attention segments), ``attention`` (the core
attention), ``layer_spec`` (the block as a ``TransformerLayer``), ``merger`` (2x2 patch merger),
``encoder`` (Qwen2.5-VL's tower, ``build_vision_encoder``), ``qwen3_encoder`` (Qwen3-VL's tower),
``weights`` (HF mapping).
"""

from megatron_papo.models.vision.encoder import Qwen25VisionEncoder, build_vision_encoder
from megatron_papo.models.vision.qwen3_encoder import Qwen3VisionEncoder
from megatron_papo.models.vision.weights import export_hf_vision_weights, load_hf_vision_weights

__all__ = [
    "Qwen25VisionEncoder",
    "Qwen3VisionEncoder",
    "build_vision_encoder",
    "export_hf_vision_weights",
    "load_hf_vision_weights",
]
