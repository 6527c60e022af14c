"""The broadcast weight-sync group and bucket format (``megatron_papo.rollout.weight_group``), without vLLM:
real processes meet through ``open_group`` over gloo, as the trainer and a server's workers do."""

import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from multiprocess import START_METHOD, free_port

from megatron_papo.rollout.weight_group import ALIGN, open_group, pack, unpack


def named_tensors(seed: int) -> list[tuple[str, torch.Tensor]]:
    """Tensors of several dtypes and shapes, sizes not multiples of the alignment, a 0-d one."""
    g = torch.Generator().manual_seed(seed)
    return [
        ("a.weight", torch.randn(3, 5, generator=g)),
        ("b.bias", torch.randn(7, generator=g).to(torch.bfloat16)),
        ("c.index", torch.randint(0, 1000, (2, 3), generator=g)),
        ("d.scale", torch.tensor(1.5, dtype=torch.float64)),
        ("e.mask", torch.rand(5, generator=g) > 0.5),
        ("f.view", torch.randn(4, 6, generator=g).t()),  # not contiguous
    ]


def test_pack_unpack_round_trip_is_exact_and_aligned():
    named = named_tensors(0)
    buffer, metas = pack(named, torch.device("cpu"))
    assert buffer.dtype == torch.uint8 and all(m["offset"] % ALIGN == 0 for m in metas)
    assert buffer.numel() == sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for _, t in named)
    out = unpack(buffer, metas)
    assert [n for n, _ in out] == [n for n, _ in named]
    for (_, got), (_, want) in zip(out, named, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_unpack_names_the_tensor_of_a_bad_bucket():
    buffer, metas = pack(named_tensors(0), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"'b.bias' has unknown dtype 'bfloat17'"):
        unpack(buffer, [metas[0], metas[1] | {"dtype": "bfloat17"}])
    with pytest.raises(ValueError, match=r"'f.view' .* does not fit the \d+-byte bucket"):
        unpack(buffer[:-16], metas)
    with pytest.raises(ValueError, match=r"'a.weight' .* at offset 3"):
        unpack(buffer, [metas[0] | {"offset": 3}])


def _member(rank: int, world_size: int, port: int, out_dir: str, die: bool) -> None:
    """Rank 0 broadcasts two buckets; the others receive them (rank ``world_size - 1`` exits after the
    first when ``die``) and save what they got."""
    group = open_group("127.0.0.1", port, rank, world_size, "gloo", timeout_s=60)
    got, failure = [], ""
    for seed in (1, 2):
        if rank == 0:
            buffer, metas = pack(named_tensors(seed), torch.device("cpu"))
            try:
                group.broadcast(buffer)
            except RuntimeError as e:
                failure = f"{type(e).__name__}: {e}"
                break
        else:
            if die and rank == world_size - 1 and seed == 2:
                os._exit(0)
            sent, metas = pack(named_tensors(seed), torch.device("cpu"))  # what HTTP would tell a server
            buffer = torch.empty(sent.numel(), dtype=torch.uint8)
            group.broadcast(buffer)
            got.append({name: t.clone() for name, t in unpack(buffer, metas)})
    torch.save({"got": got, "failure": failure}, os.path.join(out_dir, f"{rank}.pt"))


def run_group(world_size: int, tmp_path, die: bool = False) -> list[dict]:
    ctx = mp.start_processes(
        _member, args=(world_size, free_port(), str(tmp_path), die), nprocs=world_size, join=False,
        start_method=START_METHOD,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):  # raises a member's exception with its traceback
        assert time.monotonic() < deadline, "weight group members still running after 120 s"
    return [torch.load(tmp_path / f"{r}.pt") for r in range(world_size) if (tmp_path / f"{r}.pt").exists()]


def test_broadcast_reaches_every_member_of_the_group(tmp_path):
    """The trainer (rank 0) and two server workers meet through a store only: each worker receives both
    buckets bit-exactly."""
    results = run_group(3, tmp_path)
    assert results[0]["failure"] == ""
    for r in results[1:]:
        assert len(r["got"]) == 2
        for got, seed in zip(r["got"], (1, 2), strict=True):
            for name, want in named_tensors(seed):
                assert torch.equal(got[name], want), name


def test_a_member_that_dies_fails_the_broadcast_instead_of_hanging(tmp_path):
    results = run_group(2, tmp_path, die=True)
    assert len(results) == 1 and "gloo" in results[0]["failure"].lower(), results[0]["failure"]


def test_joining_a_group_nobody_else_joins_fails_after_the_timeout():
    start = time.monotonic()
    with pytest.raises(Exception, match="(?i)timeout|timed out"):
        open_group("127.0.0.1", free_port(), 0, 2, "gloo", timeout_s=3)
    assert time.monotonic() - start < 30
