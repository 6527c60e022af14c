"""Qwen3-VL (dense) on megatron-core: Qwen2.5-VL's pipeline stage with Qwen3-VL's differences.

What the two share lives in ``qwen25vl`` (``Qwen25VLModel``: embedding, image placement, ``GPTModel``,
pipeline plumbing). The differences, one module each: the vision tower (``vision.qwen3_encoder``: 16px
patches with a biased embedding, learned position embeddings interpolated to the image grid
(``vision.position_grid``), LayerNorm blocks, DeepStack mergers), DeepStack (``deepstack``), interleaved
M-RoPE (``mrope``), and q/k RMSNorm without QKV bias in the text attention (``config.language_config``
and ``qwen25vl.decoder_spec``).
"""

from __future__ import annotations

import torch

from megatron_papo.models.config import ModelConfig
from megatron_papo.models.deepstack import pack
from megatron_papo.models.mrope import InterleavedMRoPE
from megatron_papo.models.qwen25vl import Qwen25VLModel


class Qwen3VLModel(Qwen25VLModel):
    """One pipeline stage of Qwen3-VL; the forward is ``Qwen25VLModel``'s (position_ids [3, b, s] from
    ``mrope_position_ids``, pixel_values [patches, 3*2*16*16]).

    With images, the first stage's decoder input packs the DeepStack maps after the embeddings
    ([s, b, hidden * (1 + k)]) and the first k ``DeepStackLayer``s add them, on whichever stages they are.
    """

    def __init__(self, cfg: ModelConfig, hf_config, pre_process: bool, post_process: bool) -> None:
        text = hf_config.get_text_config()
        deepstack = len(hf_config.vision_config.deepstack_visual_indexes)
        if deepstack > text.num_hidden_layers:
            raise ValueError(
                f"{deepstack} DeepStack vision blocks need as many LM layers, the model has "
                f"{text.num_hidden_layers}"
            )
        super().__init__(cfg, hf_config, pre_process, post_process)
        theta = text.rope_parameters["rope_theta"]
        self.language_model.rotary_pos_emb = InterleavedMRoPE(
            kv_channels=self.config.kv_channels, rotary_percent=1.0, rotary_base=theta
        )

    def with_images(
        self,
        embeddings: torch.Tensor,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
    ) -> torch.Tensor:
        """[s, b, hidden * (1 + k)]: the embeddings with the image features in the placeholders, then each
        DeepStack block's features at the placeholders (zeros elsewhere)."""
        features, deepstack = self.vision(pixel_values, image_grid_thw)
        maps = [self.at_image_tokens(torch.zeros_like(embeddings), input_ids, f) for f in deepstack]
        return pack(self.at_image_tokens(embeddings, input_ids, features), maps)
