"""Token balancing of a rollout batch across data-parallel ranks.

Each DP rank generates its own prompts' groups, so one rank can hold most of the long responses and the
whole DP group waits for it in every micro-batch of the step. With token-budget micro-batches
(``trainer.max_tokens_per_micro_batch``) the trainer first redistributes whole groups (a prompt's ``n``
responses stay together: their advantages are relative to each other) so that every rank holds the same
number of groups and about the same number of tokens. The loss is unchanged: the global token-mean divides
by the DP group's token count wherever the tokens sit.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist

from megatron_papo.parallel.device import current_device

T = TypeVar("T")


def balanced_assignment(tokens: list[list[int]]) -> list[list[tuple[int, int]]]:
    """Where each group goes: ``tokens[r][i]``, the tokens of rank ``r``'s group ``i`` (every rank the same
    number of groups) -> for each destination rank, its (source rank, index) pairs in order.

    Longest-processing-time greedy: groups by decreasing tokens (ties: source rank, then index), each to
    the rank with the fewest tokens so far among those below their quota (ties: its own source rank, then
    the lowest rank). Deterministic: every rank computes the same plan from the same counts.
    """
    quota = len(tokens[0])
    if any(len(t) != quota for t in tokens):
        sizes = [len(t) for t in tokens]
        raise ValueError(f"DP balancing: every rank must hold the same number of groups, got {sizes}")
    order = sorted(
        ((n, src, i) for src, per_rank in enumerate(tokens) for i, n in enumerate(per_rank)),
        key=lambda x: (-x[0], x[1], x[2]),
    )
    loads = [0] * len(tokens)
    plan: list[list[tuple[int, int]]] = [[] for _ in tokens]
    for n, src, i in order:
        open_ranks = [r for r in range(len(tokens)) if len(plan[r]) < quota]
        dst = min(open_ranks, key=lambda r: (loads[r], r != src, r))
        plan[dst].append((src, i))
        loads[dst] += n
    return plan


def balance_groups(
    groups: list[T], tokens: list[int], group: dist.ProcessGroup | None
) -> tuple[list[T], dict[str, float]]:
    """This rank's groups after ``balanced_assignment`` over the DP ``group`` (collective: every rank
    calls it with the same number of groups), and ``dp/token_imbalance_before`` / ``_after`` (the largest
    rank's tokens over the mean). Groups travel pickled, each only to its destination
    (``scatter_object_list`` from every source in turn); model-parallel peers holding the same groups end
    with the same ones."""
    dp_size = 1 if group is None else dist.get_world_size(group)
    if dp_size == 1:
        return groups, {}
    local = torch.tensor(tokens, dtype=torch.int64, device=current_device())
    gathered = [torch.empty_like(local) for _ in range(dp_size)]
    dist.all_gather(gathered, local, group=group)
    counts = [t.tolist() for t in gathered]
    plan = balanced_assignment(counts)
    rank = dist.get_rank(group)
    received: dict[tuple[int, int], T] = {}
    for src in range(dp_size):
        outgoing = None
        if src == rank:  # destination d receives the groups of its plan that this rank holds
            outgoing = [[groups[i] for s, i in plan[d] if s == src] for d in range(dp_size)]
        incoming: list[list[T] | None] = [None]
        dist.scatter_object_list(incoming, outgoing, group=group, group_src=src)
        mine = [i for s, i in plan[rank] if s == src]
        received.update(((src, i), g) for i, g in zip(mine, incoming[0] or [], strict=True))
    before = [sum(c) for c in counts]
    after = [sum(counts[s][i] for s, i in dest) for dest in plan]
    mean = sum(before) / dp_size
    stats = {"dp/token_imbalance_before": max(before) / mean, "dp/token_imbalance_after": max(after) / mean}
    return [received[key] for key in plan[rank]], stats
