"""Whole tensors from their tensor-parallel shards."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def tp_gather(shard: torch.Tensor) -> list[torch.Tensor]:
    """Copies of ``shard`` from every TP rank, in rank order (never the tensor itself: exports must not
    alias parameters). A TP collective."""
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return [shard.clone()]
    shards = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(shards, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
    return shards
