"""Qwen3-VL's interleaved multimodal RoPE, as the rotary module of megatron-core's ``GPTModel``."""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding


class InterleavedMRoPE(MultimodalRotaryEmbedding):
    """position_ids [3, b, s] (t, h, w) -> angles [s, b, 1, head_dim] for megatron-core's
    ``apply_rotary_pos_emb`` (non-interleaved halves).

    Qwen2.5-VL's M-RoPE (megatron-core's ``MultimodalRotaryEmbedding``) gives each axis a contiguous block
    of frequencies; Qwen3-VL's interleaves them: frequency ``j`` follows the h position when ``j % 3 == 1``
    and ``j < 3 * mrope_section[1]``, the w position when ``j % 3 == 2`` and ``j < 3 * mrope_section[2]``,
    the t position otherwise (transformers' ``Qwen3VLTextRotaryEmbedding``).
    """

    def forward(
        self,
        position_ids: torch.Tensor,
        mrope_section: list[int],
        cp_group: torch.distributed.ProcessGroup | None = None,
    ) -> torch.Tensor:
        if cp_group is not None and cp_group.size() > 1:
            raise NotImplementedError("interleaved M-RoPE does not support context parallelism")
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [3, b, s, head_dim / 2]
        axis = torch.zeros(freqs.shape[-1], dtype=torch.long, device=freqs.device)
        for dim in (1, 2):
            axis[dim : 3 * mrope_section[dim] : 3] = dim
        t, h, w = freqs
        chosen = torch.where(axis == 1, h, torch.where(axis == 2, w, t))  # [b, s, head_dim / 2]
        return torch.cat([chosen, chosen], dim=-1).transpose(0, 1)[:, :, None, :].contiguous()
