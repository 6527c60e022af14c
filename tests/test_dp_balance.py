"""Token balancing of the rollout batch across DP ranks (``training.dp_balance``): the plan, and the real
exchange over gloo at DP=2 x TP=2 (model-parallel peers must end with the same groups)."""

import random

import torch
from megatron.core import parallel_state as ps
from multiprocess import run_distributed

from megatron_papo.training.dp_balance import balance_groups, balanced_assignment


def _imbalance(tokens: list[list[int]], plan: list[list[tuple[int, int]]] | None = None) -> float:
    loads = [sum(t) for t in tokens] if plan is None else [sum(tokens[s][i] for s, i in d) for d in plan]
    return max(loads) / (sum(loads) / len(loads))


def test_plan_keeps_every_group_once_and_evens_the_tokens():
    rng = random.Random(0)
    for dp, quota in ((2, 4), (4, 8), (8, 16)):
        # long-tailed lengths (most short, some at the cap), the longest crowded on rank 0
        lengths = sorted((rng.choice([40, 60, 80, 100, 512]) for _ in range(dp * quota)), reverse=True)
        tokens = [lengths[r * quota : (r + 1) * quota] for r in range(dp)]
        plan = balanced_assignment(tokens)
        assert sorted(k for d in plan for k in d) == [(s, i) for s in range(dp) for i in range(quota)]
        assert all(len(d) == quota for d in plan)
        before, after = _imbalance(tokens), _imbalance(tokens, plan)
        mean = sum(lengths) / dp
        assert after < before and after * mean <= mean + max(lengths), (dp, before, after)
        assert balanced_assignment(tokens) == plan  # deterministic
    # already even: nothing moves
    assert balanced_assignment([[10, 5], [10, 5]]) == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]


def _length(src: int, i: int) -> int:
    return 100 + 50 * i if src == 0 else 10 + i  # DP rank 0 holds the long groups


def _exchange(quota: int) -> tuple[list[tuple[int, int]], dict[str, float]]:
    dp_rank = ps.get_data_parallel_rank()
    lengths = [_length(dp_rank, i) for i in range(quota)]
    groups = [{"src": dp_rank, "i": i, "tokens": torch.full((n,), dp_rank)} for i, n in enumerate(lengths)]
    mine, stats = balance_groups(groups, lengths, ps.get_data_parallel_group())
    for g in mine:  # the tensors arrive whole
        assert g["tokens"].shape == (_length(g["src"], g["i"]),) and bool((g["tokens"] == g["src"]).all())
    return [(g["src"], g["i"]) for g in mine], stats


def test_exchange_over_gloo_at_dp2_tp2():
    quota = 4
    results = run_distributed(_exchange, 4, quota, tp=2)
    by_rank = [r[0] for r in results]
    assert by_rank[0] == by_rank[1] and by_rank[2] == by_rank[3]  # TP peers: the same groups
    dp_parts = [by_rank[0], by_rank[2]]
    assert sorted(k for part in dp_parts for k in part) == [(s, i) for s in range(2) for i in range(quota)]
    stats = results[0][1]
    assert stats["dp/token_imbalance_after"] < stats["dp/token_imbalance_before"]
    assert all(len(part) == quota for part in dp_parts)
    assert {s for s, _ in dp_parts[1]} == {0, 1}  # rank 1 took some of rank 0's long groups
