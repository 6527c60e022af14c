"""The 2x2 patch merger: from the vision width to the LM width, tensor-parallel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_papo.models.vision.config import NORM_EPS


class PatchMerger(MegatronModule):
    """[patches, 1, hidden] -> [patches / merge_unit, out_hidden_size].

    Normalize, concatenate each group of ``merge_unit`` consecutive patches (one 2x2 block), then Linear
    (column-parallel) -> GELU -> Linear (row-parallel). The norm is the vision config's (``RMSNorm`` in
    transformers' ``Qwen2_5_VLPatchMerger``, ``LayerNorm`` in ``Qwen3VLVisionPatchMerger``), over each patch
    or, with ``postshuffle_norm`` (Qwen3-VL's DeepStack mergers), over each concatenated group.
    """

    def __init__(
        self, config: TransformerConfig, merge_unit: int, out_hidden_size: int, postshuffle_norm: bool = False
    ) -> None:
        super().__init__(config)
        self.width = config.hidden_size * merge_unit
        self.postshuffle_norm = postshuffle_norm
        norm = torch.nn.LayerNorm if config.normalization == "LayerNorm" else torch.nn.RMSNorm
        normalized = self.width if postshuffle_norm else config.hidden_size
        self.ln_q = norm(normalized, eps=NORM_EPS, dtype=config.params_dtype)
        self.fc1 = ColumnParallelLinear(
            self.width,
            self.width,
            config=config,
            init_method=config.init_method,
            bias=True,
            gather_output=False,
        )
        self.fc2 = RowParallelLinear(
            self.width,
            out_hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            grouped = self.ln_q(hidden_states.view(-1, 1, self.width))
        else:
            grouped = self.ln_q(hidden_states).view(-1, 1, self.width)
        intermediate, _ = self.fc1(grouped)
        out, _ = self.fc2(F.gelu(intermediate))
        return out.squeeze(1)
