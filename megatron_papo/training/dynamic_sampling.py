"""DAPO dynamic sampling across the data-parallel group: sample rounds until the DP group holds a full
rollout batch of informative groups, then share the kept groups out so every rank trains on its quota."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import torch.distributed as dist

from megatron_papo.parallel.device import current_device

T = TypeVar("T")


class DynamicSamplingError(RuntimeError):
    """The DP group kept too few informative groups in ``max_tries`` rounds (raised on every rank)."""


@dataclass
class FilledBatch(Generic[T]):
    """One DP rank's share of a filled rollout batch; the counts are over the whole DP group."""

    groups: list[T]  # exactly ``quota``
    tries: int  # rounds run, the same on every rank
    generated: int  # groups generated
    kept: int  # informative groups kept
    surplus: int  # kept groups beyond the batch, not used

    @property
    def keep_rate(self) -> float:
        return self.kept / self.generated if self.generated else 0.0


def fill_rollout_batch(
    sample_round: Callable[[], tuple[list[T], int]],
    quota: int,
    max_tries: int,
    group: dist.ProcessGroup | None,
    device: torch.device | None = None,
) -> FilledBatch[T]:
    """Run sampling rounds until the DP ``group`` has kept ``quota`` groups per rank; return this rank's.

    Collective over ``group``: every rank of it must call this with the same ``quota`` and ``max_tries``
    (``group=None``: no data parallelism, no collectives; ``device``: where its tensor collectives' buffers
    live, default the current device). ``sample_round()`` runs one round on this rank
    and returns (the informative groups it kept, the number of groups it generated). All ranks run the
    same rounds and stop after the first one at which the group holds ``quota * dp_size`` kept groups in
    total; after ``max_tries`` rounds without that, every rank raises ``DynamicSamplingError``.

    Each rank then takes its first ``min(kept, quota)`` groups; a rank that kept fewer is topped up, in
    rank order, from the pool of the other ranks' groups beyond their quota (ordered by source rank, then
    as kept). Leftovers are the surplus, counted but not used. The result depends only on each rank's
    kept lists, so model-parallel peers that kept the same groups end with the same batch. Groups travel
    pickled (``all_gather_object``): they may hold CPU tensors.
    """
    dp_size = 1 if group is None else dist.get_world_size(group)
    needed = quota * dp_size
    kept: list[T] = []
    generated = tries = 0
    while True:
        tries += 1
        groups, n = sample_round()
        kept += groups
        generated += n
        # [rank] -> [kept, generated]
        counts = _all_gather_counts([len(kept), generated], group, device or current_device())
        total_kept, total_generated = (sum(c) for c in zip(*counts, strict=True))
        if total_kept >= needed:
            break
        if tries >= max_tries:
            rate = total_kept / total_generated if total_generated else 0.0
            raise DynamicSamplingError(
                f"dynamic sampling: {tries} tries generated {total_generated} groups on {dp_size} DP "
                f"rank(s) and kept {total_kept} informative ones (keep rate {rate:.1%}); the rollout batch "
                f"needs {needed}. Raise algorithm.max_tries, or check the data and the reward: nearly "
                "every group is all-correct (too easy) or all-wrong (too hard)."
            )

    batch = kept[:quota]
    per_rank = [c[0] for c in counts]
    if min(per_rank) < quota:  # never with one rank: it alone holds the whole batch
        rank = dist.get_rank(group)
        spare = [max(k - quota, 0) for k in per_rank]
        short = [max(quota - k, 0) for k in per_rank]
        # only the pool's first sum(short) entries are taken: send just this rank's part of them
        parts: list[list[T]] = [[] for _ in range(dp_size)]
        dist.all_gather_object(parts, kept[quota:][: max(sum(short) - sum(spare[:rank]), 0)], group=group)
        pool = [g for part in parts for g in part]
        start = sum(short[:rank])
        batch += pool[start : start + short[rank]]
    return FilledBatch(batch, tries, total_generated, total_kept, total_kept - needed)


def _all_gather_counts(
    counts: list[int], group: dist.ProcessGroup | None, device: torch.device
) -> list[list[int]]:
    """``counts`` of every rank of ``group``, in rank order (gathered on ``device``)."""
    if group is None or dist.get_world_size(group) == 1:
        return [counts]
    local = torch.tensor(counts, dtype=torch.int64, device=device)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, local, group=group)
    return torch.stack(out).tolist()
