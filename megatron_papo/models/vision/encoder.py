"""The Qwen2.5-VL vision tower on megatron-core: ``Qwen25VisionEncoder``; ``build_vision_encoder`` builds
it or Qwen3-VL's ``Qwen3VisionEncoder``, by the vision config's model type."""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from megatron_papo.models.vision.config import QWEN3_VISION, vision_transformer_config
from megatron_papo.models.vision.inputs import check_inputs
from megatron_papo.models.vision.layer_spec import vision_layer_spec
from megatron_papo.models.vision.merger import PatchMerger
from megatron_papo.models.vision.patch_embed import PatchEmbed
from megatron_papo.models.vision.qwen3_encoder import Qwen3VisionEncoder
from megatron_papo.models.vision.rotary import VisionRotaryEmbedding
from megatron_papo.models.vision.segments import Segments, VisionSegments

ATTENTION_BACKENDS = ("auto", "sdpa")


class Qwen25VisionEncoder(MegatronModule):
    """pixel_values [patches, channels * temporal * patch**2], grid_thw [images, 3] (t, h, w in patches)
    -> image features [patches / merge_unit, out_hidden_size], images in ``grid_thw`` order and each
    image's merged tokens row-major: exactly what transformers' ``model.visual(...).pooler_output`` gives.

    As transformers does, the patches are reordered window by window (``get_vision_window_index``), the
    blocks attend within windows or, in ``fullatt_block_indexes``, within images (``cu_seqlens``), and
    the merged tokens are put back in image order at the end. Heads and MLP columns are split over TP;
    every rank holds the full output.
    """

    def __init__(self, config: TransformerConfig, hf_vision) -> None:
        super().__init__(config)
        self.merge_size = hf_vision.spatial_merge_size
        self.merge_unit = self.merge_size**2
        self.window_size, self.patch_size = hf_vision.window_size, hf_vision.patch_size
        kernel = (hf_vision.in_channels, hf_vision.temporal_patch_size, self.patch_size, self.patch_size)
        self.patch_embed = PatchEmbed(kernel, config.hidden_size, config.params_dtype)
        self.patch_dim = self.patch_embed.weight.shape[1]
        self.rotary = VisionRotaryEmbedding(config.kv_channels, hf_vision.rope_parameters["rope_theta"])
        self.decoder = TransformerBlock(
            config,
            vision_layer_spec(hf_vision.fullatt_block_indexes),
            post_layer_norm=False,
            pre_process=True,
            post_process=False,
        )
        self.merger = PatchMerger(config, self.merge_unit, hf_vision.out_hidden_size)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        check_inputs(pixel_values, grid_thw, self.patch_dim, self.merge_size)
        device, grid = pixel_values.device, grid_thw.detach().cpu()
        window_index, cu_windows = get_vision_window_index(
            grid, self.merge_size, self.window_size, self.patch_size
        )
        # patch order in windows: each merged token's merge_unit patches stay together
        order = (window_index[:, None] * self.merge_unit + torch.arange(self.merge_unit)).flatten()
        order, window_index = order.to(device), window_index.to(device)
        hidden = self.patch_embed(pixel_values)[order].unsqueeze(1)  # [patches, 1, hidden]
        positions = get_vision_position_ids(grid, self.merge_size).to(device)[order]
        segments = VisionSegments(
            windows=Segments.from_cu_seqlens(cu_windows, device),
            images=Segments.from_cu_seqlens(get_vision_cu_seqlens(grid), device),
        )
        hidden = self.decoder(
            hidden, attention_mask=None, rotary_pos_emb=self.rotary(positions), packed_seq_params=segments
        )
        return self.merger(hidden)[torch.argsort(window_index)]


def build_vision_encoder(
    hf_vision_config,
    lm_hidden_size: int,
    *,
    params_dtype: torch.dtype,
    attention_backend: str = "sdpa",
) -> Qwen25VisionEncoder | Qwen3VisionEncoder:
    """This TP rank's shard of the vision tower of ``hf_vision_config`` (random weights: load them with
    ``load_hf_vision_weights``). ``attention_backend``: ``sdpa`` (PyTorch's scaled_dot_product_attention
    over equal-length windows / images) or ``auto`` (the same; transformer-engine is not used here)."""
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend {attention_backend!r} is not supported, use one of {ATTENTION_BACKENDS}"
        )
    if hf_vision_config.out_hidden_size != lm_hidden_size:
        raise ValueError(
            f"vision_config.out_hidden_size {hf_vision_config.out_hidden_size} differs from the LM hidden "
            f"size {lm_hidden_size}: the image features would not fit the token embeddings"
        )
    config = vision_transformer_config(hf_vision_config, params_dtype=params_dtype)
    if hf_vision_config.model_type == QWEN3_VISION:
        return Qwen3VisionEncoder(config, hf_vision_config)
    return Qwen25VisionEncoder(config, hf_vision_config)
