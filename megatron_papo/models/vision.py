"""The Qwen2.5-VL vision tower, tensor-parallel on megatron-core's parallel linear layers.

Matches transformers' ``Qwen2_5_VisionTransformerPretrainedModel``: a patch embedding (the Conv3d with
stride = kernel is a linear map of each flattened patch), 2D rotary embedding, window attention with
full attention in ``fullatt_block_indexes`` (per-image block-diagonal masks), RMSNorm, a SwiGLU MLP
with bias, and the 2x2 patch merger to the LM width. Attention heads and MLP columns are split over TP
(QKV and gate/up column-parallel, output projections row-parallel). The index bookkeeping (window
order, sequence boundaries, rotary positions) is transformers' own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLVisionRotaryEmbedding,
    apply_rotary_pos_emb_vision,
)
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index


def _init(weight: torch.Tensor) -> None:
    torch.nn.init.normal_(weight, std=0.02)


def _column(config: TransformerConfig, n_in: int, n_out: int) -> ColumnParallelLinear:
    return ColumnParallelLinear(n_in, n_out, config=config, init_method=_init, bias=True, gather_output=False)


def _row(config: TransformerConfig, n_in: int, n_out: int) -> RowParallelLinear:
    return RowParallelLinear(
        n_in, n_out, config=config, init_method=_init, bias=True, input_is_parallel=True, skip_bias_add=False
    )


def _block_mask(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """[n, n] bool, True where two patches share a segment of ``cu_seqlens`` (may attend)."""
    segment = torch.bucketize(torch.arange(n), cu_seqlens[1:].long(), right=True)
    return segment.unsqueeze(0) == segment.unsqueeze(1)


class VisionBlock(MegatronModule):
    """x + attn(norm1(x)), then + mlp(norm2(x)). x: [patches, 1, hidden] (replicated over TP)."""

    def __init__(self, config: TransformerConfig, hf_vision) -> None:
        super().__init__(config)
        hidden, tp = hf_vision.hidden_size, ps.get_tensor_model_parallel_world_size()
        self.heads = hf_vision.num_heads // tp
        self.head_dim = hidden // hf_vision.num_heads
        self.norm1 = torch.nn.RMSNorm(hidden, eps=1e-6)
        self.norm2 = torch.nn.RMSNorm(hidden, eps=1e-6)
        self.qkv = _column(config, hidden, 3 * hidden)  # local rows: [q; k; v] of this rank's heads
        self.proj = _row(config, hidden, hidden)
        self.gate_proj = _column(config, hidden, hf_vision.intermediate_size)
        self.up_proj = _column(config, hidden, hf_vision.intermediate_size)
        self.down_proj = _row(config, hf_vision.intermediate_size, hidden)

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv, _ = self.qkv(self.norm1(x))
        q, k, v = qkv.view(n, 3, self.heads, self.head_dim).unbind(1)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, n, d]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        out, _ = self.proj(attn.squeeze(0).transpose(0, 1).reshape(n, 1, -1))
        x = x + out
        h = self.norm2(x)
        gate, _ = self.gate_proj(h)
        up, _ = self.up_proj(h)
        out, _ = self.down_proj(F.silu(gate) * up)
        return x + out


class PatchMerger(MegatronModule):
    """RMSNorm, then each 2x2 group of patches (concatenated) through Linear-GELU-Linear to the LM width."""

    def __init__(self, config: TransformerConfig, hf_vision) -> None:
        super().__init__(config)
        self.width = hf_vision.hidden_size * hf_vision.spatial_merge_size**2
        self.ln_q = torch.nn.RMSNorm(hf_vision.hidden_size, eps=1e-6)
        self.fc1 = _column(config, self.width, self.width)
        self.fc2 = _row(config, self.width, hf_vision.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc1(self.ln_q(x).view(-1, 1, self.width))
        out, _ = self.fc2(F.gelu(h))
        return out.squeeze(1)


class VisionEncoder(MegatronModule):
    """pixel_values [patches, 3*2*14*14], grid_thw [images, 3] -> [patches / 4, lm_hidden] (image order)."""

    def __init__(self, config: TransformerConfig, hf_vision) -> None:
        super().__init__(config)
        self.hf_vision = hf_vision
        patch_dim = hf_vision.in_channels * hf_vision.temporal_patch_size * hf_vision.patch_size**2
        self.patch_embed = torch.nn.Linear(patch_dim, hf_vision.hidden_size, bias=False)
        self.rotary = Qwen2_5_VLVisionRotaryEmbedding(hf_vision)
        self.blocks = torch.nn.ModuleList(VisionBlock(config, hf_vision) for _ in range(hf_vision.depth))
        self.merger = PatchMerger(config, hf_vision)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg = self.hf_vision
        unit = cfg.spatial_merge_size**2
        n = pixel_values.shape[0]
        if int(grid_thw.prod(-1).sum()) != n:
            raise ValueError(
                f"image grids {grid_thw.tolist()} describe {int(grid_thw.prod(-1).sum())} patches, "
                f"pixel_values has {n}"
            )
        window_index, cu_window = get_vision_window_index(
            grid_thw, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size
        )
        order = (window_index.view(-1, 1) * unit + torch.arange(unit)).flatten()  # patch order in windows
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))[order].unsqueeze(1)
        cos, sin = self.rotary(x, get_vision_position_ids(grid_thw, cfg.spatial_merge_size))
        cos, sin = cos[order], sin[order]
        full = _block_mask(get_vision_cu_seqlens(grid_thw), n)
        windowed = _block_mask(cu_window, n)
        for i, block in enumerate(self.blocks):
            x = block(x, full if i in cfg.fullatt_block_indexes else windowed, cos, sin)
        merged = self.merger(x)
        return merged[torch.argsort(window_index)]
