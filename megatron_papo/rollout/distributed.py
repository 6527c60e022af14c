"""Rollouts shared out over the model-parallel ranks that hold the same prompts, and the process groups
rollout collectives run on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_papo.parallel.device import current_device
from megatron_papo.rollout.engine import Rollout, RolloutEngine, RolloutRequest


@dataclass(frozen=True)
class RolloutGroups:
    """The groups of a rank's rollout collectives: ``model_parallel`` (the ranks that share out one DP
    rank's requests) and ``data_parallel`` (the ranks DAPO pools kept groups over); ``device``: where the
    buffers of their tensor collectives live."""

    model_parallel: dist.ProcessGroup
    data_parallel: dist.ProcessGroup
    device: torch.device

    @classmethod
    def trainers(cls) -> RolloutGroups:
        """megatron-core's groups: rollouts on the training thread, between its collectives."""
        return cls(ps.get_model_parallel_group(), ps.get_data_parallel_group(), current_device())

    @classmethod
    def private(cls) -> RolloutGroups:
        """gloo copies of megatron-core's groups, for rollouts on a thread of their own beside the training
        thread's collectives (collectives of one group must not interleave across threads). A collective:
        every rank calls it, before that thread starts."""
        return cls(
            _gloo_copy(ps.get_model_parallel_group()),
            _gloo_copy(ps.get_data_parallel_group()),
            torch.device("cpu"),
        )


def _gloo_copy(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A gloo group of the same ranks as ``group``: every rank creates every rank's copy, in one order."""
    everyone: list[list[int]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, dist.get_process_group_ranks(group))
    mine = None
    for ranks in sorted({tuple(r) for r in everyone}):
        copy = dist.new_group(list(ranks), backend="gloo")
        if dist.get_rank() in ranks:
            mine = copy
    assert mine is not None
    return mine


def generate_in_model_parallel_group(
    engine: RolloutEngine,
    requests: list[RolloutRequest],
    n: int,
    group: dist.ProcessGroup | None = None,
) -> list[list[Rollout]]:
    """``engine.generate(requests, n)`` with the requests spread round-robin over this rank's tensor x
    pipeline group (``group``, default megatron-core's; its ranks all hold the same ``requests``); every
    rank gets every result."""
    group = ps.get_model_parallel_group() if group is None else group
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    mine = list(range(rank, len(requests), size))
    local = dict(zip(mine, engine.generate([requests[j] for j in mine], n), strict=True))
    gathered: list[dict[int, list[Rollout]]] = [{} for _ in range(size)]
    dist.all_gather_object(gathered, local, group=group)
    merged = {j: out for part in gathered for j, out in part.items()}
    return [merged[j] for j in range(len(requests))]
