"""DAPO dynamic sampling across the DP group (real gloo processes): every rank ends with exactly its quota,
short ranks are topped up from the others' surplus in rank order, all ranks run and stop (or fail)
together, and groups holding tensors arrive bit-exact."""

import math
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from multiprocess import run_distributed

from megatron_papo.training.dynamic_sampling import DynamicSamplingError, FilledBatch, fill_rollout_batch

COLLECTIVES = ("all_gather", "all_gather_object", "all_reduce", "broadcast", "broadcast_object_list")


def _group(src: int, round_: int, i: int) -> dict:
    """Kept group ``i`` of round ``round_`` on source rank ``src``: an id and tensors like a rollout's."""
    g = torch.Generator().manual_seed(1000 * src + 20 * round_ + i)
    return {
        "id": (src, round_, i),
        "pixel_values": torch.randn(6, 8, generator=g),
        "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "input_ids": torch.randint(0, 50_000, (7,), generator=g),
        "special": torch.tensor([math.nan, -0.0, math.inf, -math.inf]),
    }


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _check_groups(groups: list[dict]) -> list[tuple]:
    """The groups' ids, after checking every tensor is bit-identical to the one sampled at the source."""
    for g in groups:
        want = _group(*g["id"])
        assert g.keys() == want.keys()
        assert all(_same_bits(g[k], want[k]) for k in want if k != "id"), g["id"]
    return [g["id"] for g in groups]


class _Sampler:
    """``sample_round`` of source rank ``src``: round r keeps ``keeps[r]`` of ``generated`` groups."""

    def __init__(self, src: int, keeps: list[int], generated: int) -> None:
        self.src, self.keeps, self.generated, self.calls = src, keeps, generated, 0

    def __call__(self) -> tuple[list[dict], int]:
        r = self.calls
        self.calls += 1
        return [_group(self.src, r, i) for i in range(self.keeps[r])], self.generated


@contextmanager
def _count_collectives():
    counts: Counter = Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name, fn):
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return call

    for name, fn in originals.items():
        setattr(dist, name, counting(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _run(src: int, keeps: list[int], quota: int, max_tries: int, group, generated: int = 8) -> dict:
    """One fill on this rank; its result (or error message), the rounds it sampled, its collectives."""
    sampler = _Sampler(src, keeps, generated)
    with _count_collectives() as counts:
        try:
            out: FilledBatch | str = fill_rollout_batch(sampler, quota, max_tries, group)
        except DynamicSamplingError as e:
            out = str(e)
    return {"out": out, "calls": sampler.calls, "collectives": dict(counts)}


def _scenarios() -> dict:
    """Every multi-process case, on 4 ranks: DP=2 x TP=2, the TP peers of a DP rank sampling the same
    groups (source = DP rank), plus the whole world as one DP group of 4 and each rank alone."""
    from megatron.core import parallel_state as ps

    dp, dp_rank, rank = ps.get_data_parallel_group(), ps.get_data_parallel_rank(), dist.get_rank()
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    return {  # in this order: a failed fill must leave the groups in step for the next ones
        "dp_rank": dp_rank,
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "too_few": _run(dp_rank, [[3, 3], [0, 0]][dp_rank], quota=4, max_tries=2, group=dp),
        "unequal": _run(dp_rank, [[5, 5, 5], [1, 1, 1]][dp_rank], quota=4, max_tries=3, group=dp),
        "rank0_short": _run(dp_rank, [[1], [7]][dp_rank], quota=4, max_tries=3, group=dp),
        "none_short": _run(dp_rank, [[4], [6]][dp_rank], quota=4, max_tries=3, group=dp),
        # four ranks, two short: the pool is ordered by source rank and handed out in rank order
        "world": _run(rank, [[1], [6], [0], [7]][rank], quota=3, max_tries=1, group=dist.group.WORLD),
        "dp1": _run(dp_rank, [0, 3, 2], quota=4, max_tries=3, group=singles[rank]),
        "dp1_too_few": _run(dp_rank, [1, 1], quota=4, max_tries=2, group=singles[rank]),
    }


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return run_distributed(_scenarios, 4, tp=2)


def _by_dp_rank(runs: list[dict], case: str) -> list[dict]:
    """``case`` on DP ranks 0 and 1 (from TP rank 0; the peers are checked equal separately)."""
    return [next(r[case] for r in runs if r["dp_rank"] == d and r["tp_rank"] == 0) for d in (0, 1)]


@pytest.mark.timeout(180)
def test_unequal_keep_rates_fill_every_rank(runs):
    r0, r1 = _by_dp_rank(runs, "unequal")
    # DP rank 0 alone had its quota after round 1, but the DP group needed 8: both ran exactly 2 rounds
    assert r0["calls"] == r1["calls"] == 2
    for r in (r0, r1):
        b = r["out"]
        assert (b.tries, b.generated, b.kept, b.surplus) == (2, 32, 12, 4)
        assert b.keep_rate == pytest.approx(12 / 32)
        assert r["collectives"] == {"all_gather": 2, "all_gather_object": 1}
    assert _check_groups(r0["out"].groups) == [(0, 0, i) for i in range(4)]
    # rank 1 kept 2; it takes rank 0's first 2 beyond its quota, across rank 0's rounds
    assert _check_groups(r1["out"].groups) == [(1, 0, 0), (1, 1, 0), (0, 0, 4), (0, 1, 0)]


def test_pool_flows_to_lower_rank_and_is_skipped_when_nobody_is_short(runs):
    r0, r1 = _by_dp_rank(runs, "rank0_short")
    assert _check_groups(r0["out"].groups) == [(0, 0, 0), (1, 0, 4), (1, 0, 5), (1, 0, 6)]
    assert _check_groups(r1["out"].groups) == [(1, 0, i) for i in range(4)]
    assert r0["out"].surplus == r1["out"].surplus == 0
    n0, n1 = _by_dp_rank(runs, "none_short")
    assert _check_groups(n0["out"].groups) == [(0, 0, i) for i in range(4)]
    assert _check_groups(n1["out"].groups) == [(1, 0, i) for i in range(4)]
    assert n0["out"].surplus == 2
    assert n0["collectives"] == n1["collectives"] == {"all_gather": 1}


def test_four_rank_pool_in_rank_order(runs):
    want = [
        [(0, 0, 0), (1, 0, 3), (1, 0, 4)],
        [(1, 0, 0), (1, 0, 1), (1, 0, 2)],
        [(1, 0, 5), (3, 0, 3), (3, 0, 4)],
        [(3, 0, 0), (3, 0, 1), (3, 0, 2)],
    ]
    for rank, r in enumerate(runs):
        b = r["world"]["out"]
        assert (b.tries, b.generated, b.kept, b.surplus) == (1, 32, 14, 2)
        assert _check_groups(b.groups) == want[rank]


def test_too_few_raises_on_every_rank(runs):
    # DP rank 0 alone kept 6 >= its quota of 4, yet the DP group kept 6 of the 8 it needs: all raise
    for r in (r["too_few"] for r in runs):
        msg = r["out"]
        assert isinstance(msg, str), msg
        assert "2 tries" in msg and "32 groups" in msg and "kept 6" in msg and "18.8%" in msg
        assert "needs 8" in msg and "algorithm.max_tries" in msg
        assert r["calls"] == 2
        assert r["collectives"] == {"all_gather": 2}


def test_model_parallel_peers_end_with_the_same_batch(runs):
    assert sorted((r["dp_rank"], r["tp_rank"]) for r in runs) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for case in ("too_few", "unequal", "rank0_short", "none_short", "dp1", "dp1_too_few"):
        for d in (0, 1):
            peers = [r[case] for r in runs if r["dp_rank"] == d]
            if isinstance(peers[0]["out"], str):
                assert peers[0]["out"] == peers[1]["out"]
                continue
            a, b = (p["out"] for p in peers)
            assert (a.tries, a.generated, a.kept, a.surplus) == (b.tries, b.generated, b.kept, b.surplus)
            assert _check_groups(a.groups) == _check_groups(b.groups)


def test_single_rank_dp_group_uses_no_collectives(runs):
    for results in runs:
        r, err, d = results["dp1"], results["dp1_too_few"], results["dp_rank"]
        b = r["out"]
        assert (b.tries, b.generated, b.kept, b.surplus) == (3, 24, 5, 1)
        assert _check_groups(b.groups) == [(d, 1, 0), (d, 1, 1), (d, 1, 2), (d, 2, 0)]
        assert r["collectives"] == {}
        assert "2 tries" in err["out"] and "kept 2" in err["out"] and err["collectives"] == {}


def test_no_group_runs_in_process():
    sampler = _Sampler(0, [0, 3, 2], generated=4)
    b = fill_rollout_batch(sampler, 2, max_tries=5, group=None)
    assert (b.tries, b.generated, b.kept, b.surplus, sampler.calls) == (2, 8, 3, 1, 2)
    assert b.keep_rate == pytest.approx(3 / 8)
    assert _check_groups(b.groups) == [(0, 1, 0), (0, 1, 1)]
    with pytest.raises(DynamicSamplingError, match=r"3 tries generated 12 groups .* kept 0 .*keep rate 0.0%"):
        fill_rollout_batch(_Sampler(0, [0, 0, 0], 4), 2, max_tries=3, group=None)
