"""Rollouts shared out over the model-parallel ranks that hold the same prompts."""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_papo.rollout.engine import Rollout, RolloutEngine, RolloutRequest


def generate_in_model_parallel_group(
    engine: RolloutEngine, requests: list[RolloutRequest], n: int
) -> list[list[Rollout]]:
    """``engine.generate(requests, n)`` with the requests spread round-robin over this rank's tensor x
    pipeline group (whose ranks all hold the same ``requests``); every rank gets every result."""
    group = ps.get_model_parallel_group()
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    mine = list(range(rank, len(requests), size))
    local = dict(zip(mine, engine.generate([requests[j] for j in mine], n), strict=True))
    gathered: list[dict[int, list[Rollout]]] = [{} for _ in range(size)]
    dist.all_gather_object(gathered, local, group=group)
    merged = {j: out for part in gathered for j, out in part.items()}
    return [merged[j] for j in range(len(requests))]
