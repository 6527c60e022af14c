"""The Qwen3-VL vision tower on megatron-core: ``Qwen3VisionEncoder``, with its DeepStack features."""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

from megatron_papo.models.vision.inputs import check_inputs
from megatron_papo.models.vision.layer_spec import vision_layer_spec
from megatron_papo.models.vision.merger import PatchMerger
from megatron_papo.models.vision.patch_embed import PatchEmbed
from megatron_papo.models.vision.position_grid import InterpolatedPositionEmbedding
from megatron_papo.models.vision.rotary import VisionRotaryEmbedding
from megatron_papo.models.vision.segments import Segments, VisionSegments


class MergerList(torch.nn.ModuleList):
    """The DeepStack mergers, with each merger's own ``sharded_state_dict`` (a plain ``ModuleList`` would be
    saved as replicated tensors, which do not load at another TP size)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        state = {}
        for i, merger in enumerate(self):
            state.update(merger.sharded_state_dict(f"{prefix}{i}.", sharded_offsets, metadata))
        return state


class Qwen3VisionEncoder(MegatronModule):
    """pixel_values [patches, channels * temporal * 16 * 16], grid_thw [images, 3] (t, h, w in patches)
    -> (image features [patches / merge_unit, out_hidden_size], DeepStack features: one such tensor per
    ``deepstack_visual_indexes`` block), images in ``grid_thw`` order: transformers'
    ``Qwen3VLVisionModel`` (``pooler_output``, ``deepstack_features``).

    Patch embedding (with bias) plus the interpolated learned position embeddings, then LayerNorm blocks
    with a plain GELU MLP, every block attending within whole images (2D rotary as in Qwen2.5-VL); the
    outputs of the DeepStack blocks go through their own mergers (norm after the 2x2 shuffle). Heads and
    MLP columns are split over TP; every rank holds the full outputs.
    """

    def __init__(self, config: TransformerConfig, hf_vision) -> None:
        super().__init__(config)
        self.merge_size = hf_vision.spatial_merge_size
        merge_unit = self.merge_size**2
        patch = hf_vision.patch_size
        kernel = (hf_vision.in_channels, hf_vision.temporal_patch_size, patch, patch)
        self.patch_embed = PatchEmbed(kernel, config.hidden_size, config.params_dtype, bias=True)
        self.patch_dim = self.patch_embed.weight.shape[1]
        self.pos_embed = InterpolatedPositionEmbedding(
            hf_vision.num_position_embeddings, config.hidden_size, self.merge_size, config.params_dtype
        )
        self.rotary = VisionRotaryEmbedding(config.kv_channels, hf_vision.rope_parameters["rope_theta"])
        self.decoder = TransformerBlock(
            config,
            vision_layer_spec(range(hf_vision.depth)),
            post_layer_norm=False,
            pre_process=True,
            post_process=False,
        )
        self.merger = PatchMerger(config, merge_unit, hf_vision.out_hidden_size)
        self.deepstack_blocks = tuple(hf_vision.deepstack_visual_indexes)
        self.deepstack_mergers = MergerList(
            PatchMerger(config, merge_unit, hf_vision.out_hidden_size, postshuffle_norm=True)
            for _ in self.deepstack_blocks
        )

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        check_inputs(pixel_values, grid_thw, self.patch_dim, self.merge_size)
        device, grid = pixel_values.device, grid_thw.detach().cpu()
        hidden = self.patch_embed(pixel_values)
        hidden = (hidden + self.pos_embed(grid).to(hidden.dtype)).unsqueeze(1)  # [patches, 1, hidden]
        rotary = self.rotary(get_vision_position_ids(grid, self.merge_size).to(device))
        segments = VisionSegments(images=Segments.from_cu_seqlens(get_vision_cu_seqlens(grid), device))
        deepstack = []
        for index, layer in enumerate(self.decoder.layers):
            hidden, _ = layer(
                hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=segments
            )
            if index in self.deepstack_blocks:
                deepstack.append(self.deepstack_mergers[self.deepstack_blocks.index(index)](hidden))
        return self.merger(hidden), deepstack
