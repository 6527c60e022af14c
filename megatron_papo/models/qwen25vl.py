"""The Qwen2.5-VL policy on megatron-core: the vision tower (first pipeline stage) + a ``GPTModel`` LM.

The LM is megatron-core's ``GPTModel`` (RMSNorm, SwiGLU, GQA, QKV bias, multimodal RoPE, tied or untied
embeddings). On the first stage the token embeddings of the image placeholders are replaced by the
vision tower's outputs (in the order transformers uses), then the decoder runs; later stages receive
hidden states through ``set_input_tensor``. The last stage returns vocab-parallel logits.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.module import MegatronModule

from megatron_papo.models.attention import SDPAttention
from megatron_papo.models.config import ModelConfig, language_config, load_hf_config
from megatron_papo.models.vision import VisionEncoder


def layer_spec(attention: str):
    """megatron-core's layer spec for the chosen attention backend."""
    if attention == "te" or (attention == "auto" and _have_te()):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if attention in ("sdpa", "auto"):
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class Qwen25VLModel(MegatronModule):
    """forward(input_ids [b, s], position_ids [3, b, s], attention_mask [b, s], pixel_values [patches, 1176]
    | None, image_grid_thw [images, 3] | None) -> logits [b, s, vocab/tp] (last stage) or hidden states."""

    def __init__(self, cfg: ModelConfig, hf_config, pre_process: bool, post_process: bool) -> None:
        config = language_config(cfg, hf_config)
        super().__init__(config)
        text = hf_config.get_text_config()
        self.hf_config = hf_config
        self.pre_process, self.post_process = pre_process, post_process
        self.image_token_id = hf_config.image_token_id
        self.model_type = ModelType.encoder_or_decoder  # what megatron-core's schedules look for
        self.vision = VisionEncoder(config, hf_config.vision_config) if pre_process else None
        self.language_model = GPTModel(
            config,
            layer_spec(cfg.attention),
            vocab_size=text.vocab_size,
            max_sequence_length=text.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
            position_embedding_type="mrope",
            rotary_base=int(text.rope_parameters["rope_theta"]),
        )

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings with image features in the placeholders: [s, b, hidden]."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        placeholders = input_ids == self.image_token_id  # [b, s]
        count = int(placeholders.sum())
        if pixel_values is None:
            if count:
                raise ValueError(f"the batch has {count} image placeholder tokens but no pixel_values")
            return embeddings
        features = self.vision(pixel_values, image_grid_thw).to(embeddings.dtype)
        if features.shape[0] != count:
            raise ValueError(
                f"the batch has {count} image placeholder tokens but its image grids "
                f"{image_grid_thw.tolist()} give {features.shape[0]} image features"
            )
        by_batch = embeddings.transpose(0, 1).clone()  # [b, s, h]: transformers fills row-major over [b, s]
        by_batch[placeholders] = features
        return by_batch.transpose(0, 1).contiguous()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        decoder_input = self.embed(input_ids, pixel_values, image_grid_thw) if self.pre_process else None
        return self.language_model(
            input_ids=None, position_ids=position_ids, attention_mask=None, decoder_input=decoder_input
        )


def build_model(
    cfg: ModelConfig, pre_process: bool | None = None, post_process: bool | None = None
) -> Qwen25VLModel:
    """This rank's stage of the policy (random weights: load them with ``load_hf_weights``)."""
    hf_config = load_hf_config(cfg.hf_path)
    pre = ps.is_pipeline_first_stage() if pre_process is None else pre_process
    post = ps.is_pipeline_last_stage() if post_process is None else post_process
    return Qwen25VLModel(cfg, hf_config, pre, post)
