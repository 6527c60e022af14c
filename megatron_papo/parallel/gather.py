"""Whole tensors from their tensor-parallel shards."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def tp_gather(shard: torch.Tensor, to_first: bool = False) -> list[torch.Tensor] | None:
    """Copies of ``shard`` from every TP rank, in rank order (never the tensor itself: exports must not
    alias parameters). ``to_first``: only TP rank 0 receives them (a gather; the others get None), else
    every rank does. A TP collective."""
    tp, group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
    first = ps.get_tensor_model_parallel_rank() == 0
    if tp == 1:
        return [shard.clone()]
    shard = shard.contiguous()
    shards = [torch.empty_like(shard) for _ in range(tp)] if first or not to_first else None
    if to_first:
        dist.gather(shard, shards, dst=dist.get_global_rank(group, 0), group=group)
    else:
        dist.all_gather(shards, shard, group=group)
    return shards
