"""Run a function on N real processes (gloo), each with megatron-core's parallel state initialised."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    tp: int,
    pp: int,
    seed: int,
    out_dir: str,
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from megatron_papo.parallel import ParallelConfig, destroy_distributed, initialize_distributed

    initialize_distributed(
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=seed
    )
    try:
        result = fn(*args)
    finally:
        destroy_distributed()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, tp: int = 1, pp: int = 1, seed: int = 1234
) -> list[Any]:
    """Spawn ``world_size`` processes running ``fn(*args)`` after bring-up; return each rank's result.

    ``fn`` must be a module-level function (it is pickled into the children).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker,
            args=(world_size, free_port(), tp, pp, seed, out_dir, fn, args),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)
        ]
