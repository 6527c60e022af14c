"""The Qwen2.5-VL policy on megatron-core: the vision tower (first pipeline stage) + a ``GPTModel`` LM.

The LM is megatron-core's ``GPTModel`` (RMSNorm, SwiGLU, GQA, QKV bias, multimodal RoPE, tied or untied
embeddings). On the first stage the token embeddings of the image placeholders are replaced by the
vision tower's outputs (in the order transformers uses), then the decoder runs; later stages receive
hidden states through ``set_input_tensor``. The last stage returns vocab-parallel logits.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import (
    LayerNormImpl,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_papo.models.attention import SDPAttention
from megatron_papo.models.config import ModelConfig, deepstack_layers, language_config
from megatron_papo.models.deepstack import DeepStackLayer
from megatron_papo.models.image_tokens import check_image_tokens
from megatron_papo.models.norm import RMSNorm
from megatron_papo.models.vision import build_vision_encoder


def decoder_spec(attention: str, config: TransformerConfig, deepstack: int = 0) -> TransformerBlockSubmodules:
    """This stage's decoder spec for the chosen attention backend: transformer-engine's layer spec, or the
    local one with ``RMSNorm`` (sequence-parallel capable) and SDPA or megatron's own attention; q/k
    RMSNorm when ``config.qk_layernorm`` (Qwen3-VL). The model's first ``deepstack`` layers are
    ``DeepStackLayer``s."""
    if attention == "te" or (attention == "auto" and _have_te()):
        if not _have_te():
            raise ValueError("model.attention=te needs transformer-engine and a GPU; use sdpa")
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
        final_norm = LayerNormImpl
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=config.qk_layernorm)
        final_norm = RMSNorm
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RMSNorm
        attention_modules = spec.submodules.self_attention.submodules
        if config.qk_layernorm:
            attention_modules.q_layernorm = attention_modules.k_layernorm = RMSNorm
        if attention in ("sdpa", "auto"):
            attention_modules.core_attention = SDPAttention
    with_deepstack = dataclasses.replace(spec, module=DeepStackLayer)
    offset = get_transformer_layer_offset(config)
    layers = [
        with_deepstack if offset + i < deepstack else spec for i in range(get_num_layers_to_build(config))
    ]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=final_norm)


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class Qwen25VLModel(MegatronModule):
    """One pipeline stage of Qwen2.5-VL.

    forward(input_ids [b, s], position_ids [3, b, s] (multimodal RoPE), attention_mask [b, s] (1 = token,
    right padding; the causal mask already keeps tokens from seeing the padding after them),
    pixel_values [patches, 3*2*14*14] | None, image_grid_thw [images, 3] | None)
    -> logits [b, s, vocab/tp] on the last stage, hidden states [s, b, hidden] elsewhere.
    Packed sequences (``training.packing``): b = 1, the row's segments in ``packed_seq_params`` (thd), each
    with its own positions; no attention crosses a segment boundary (SDPA per segment, TE varlen).
    Original and masked images go through the same call (masking is in pixel space).
    """

    def __init__(self, cfg: ModelConfig, hf_config, pre_process: bool, post_process: bool) -> None:
        config = language_config(cfg, hf_config)
        super().__init__(config)
        text = hf_config.get_text_config()
        self.hf_config = hf_config
        self.pre_process, self.post_process = pre_process, post_process
        self.image_token_id = hf_config.image_token_id
        self.merge_size = hf_config.vision_config.spatial_merge_size
        self.model_type = ModelType.encoder_or_decoder  # what megatron-core's schedules look for
        self.vision = (
            build_vision_encoder(hf_config.vision_config, text.hidden_size, params_dtype=config.params_dtype)
            if pre_process
            else None
        )
        self.language_model = GPTModel(
            config,
            decoder_spec(cfg.attention, config, deepstack_layers(hf_config)),
            vocab_size=text.vocab_size,
            max_sequence_length=text.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
            position_embedding_type="mrope",
            rotary_base=int(text.rope_parameters["rope_theta"]),
        )
        # read by megatron-core's finalize_model_grads: tied embedding grads are summed across the first
        # and last pipeline stages
        self.share_embeddings_and_output_weights = self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.nn.Parameter | None:
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings with the image features in the placeholders: [s, b, hidden] ([s/tp, b, hidden]
        with sequence parallelism)."""
        check_image_tokens(input_ids, image_grid_thw, self.image_token_id, self.merge_size)
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        if pixel_values is None:
            if image_grid_thw is not None and len(image_grid_thw):
                raise ValueError(f"image_grid_thw {image_grid_thw.tolist()} given without pixel_values")
            return embeddings
        return self.with_images(embeddings, input_ids, pixel_values, image_grid_thw)

    def with_images(
        self,
        embeddings: torch.Tensor,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
    ) -> torch.Tensor:
        """The decoder input of a batch with images: the vision tower's features in the placeholders."""
        return self.at_image_tokens(embeddings, input_ids, self.vision(pixel_values, image_grid_thw))

    def at_image_tokens(
        self, embeddings: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        """``embeddings`` [s, b, hidden] ([s/tp, b, hidden] with sequence parallelism) with the image
        placeholders of ``input_ids`` [b, s] replaced by ``features`` [image tokens, hidden]."""
        features = features.to(embeddings.dtype)
        sequence_parallel = self.config.sequence_parallel
        if sequence_parallel:
            embeddings = tensor_parallel.gather_from_sequence_parallel_region(
                embeddings, tensor_parallel_output_grad=False
            )
        by_batch = embeddings.transpose(0, 1).clone()  # [b, s, h]: transformers fills row-major over [b, s]
        by_batch[input_ids == self.image_token_id] = features
        embeddings = by_batch.transpose(0, 1).contiguous()
        if sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        b, s = input_ids.shape
        if position_ids.shape != (3, b, s):
            raise ValueError(
                f"position_ids must be [3, {b}, {s}] (multimodal RoPE), got {tuple(position_ids.shape)}"
            )
        tp = ps.get_tensor_model_parallel_world_size()
        if self.config.sequence_parallel and s % tp:
            raise ValueError(f"sequence parallelism needs sequence length {s} to be a multiple of TP {tp}")
        decoder_input = self.embed(input_ids, pixel_values, image_grid_thw) if self.pre_process else None
        return self.language_model(
            input_ids=None,
            position_ids=position_ids,
            attention_mask=None,
            decoder_input=decoder_input,
            packed_seq_params=packed_seq_params,
        )
