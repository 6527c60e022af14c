"""Run a function on N real processes (gloo), each with megatron-core's parallel state initialised.

The processes are forked from one fork server that imported torch, megatron-core, transformers and
megatron-papo once for the whole session (``start_forkserver``, conftest.py), not spawned: a spawned
process spends ~10 s importing them, and the suite starts ~60. A rank's output goes to a file that
``run_distributed`` echoes into the test's own (captured) output, as a spawned rank's went there directly.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from megatron_papo.parallel.ports import free_port

__all__ = ["START_METHOD", "free_port", "run_distributed", "start_forkserver"]

START_METHOD = "forkserver"
PRELOAD = ["megatron_papo.trainer", "megatron_papo.sft", "megatron_papo.models.conversion"]


def start_forkserver(log_path: str) -> None:
    """Start the session's fork server in the background; it imports ``PRELOAD`` (what the ranks use) once.

    Its environment, working directory and ``sys.path`` are this process's now, before any test changes
    them (each rank sets its own distributed variables, ``_worker``); its output goes to ``log_path``.
    """
    from multiprocessing import forkserver

    mp.set_forkserver_preload(PRELOAD)
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log_path, "ab") as log:  # the server inherits stdout and stderr as they are now
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            forkserver.ensure_running()
    finally:
        for fd, copy in enumerate(saved, start=1):
            os.dup2(copy, fd)
            os.close(copy)


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
    with open(os.path.join(out_dir, f"rank{rank}.log"), "wb") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
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


def _echo_logs(out_dir: str, world_size: int) -> None:
    """Each rank's output, into this process's stderr (pytest shows it with a failing test)."""
    for rank in range(world_size):
        with contextlib.suppress(FileNotFoundError), open(os.path.join(out_dir, f"rank{rank}.log")) as f:
            if text := f.read():
                sys.stderr.write(f"--- rank {rank} ---\n{text}")


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, tp: int = 1, pp: int = 1, seed: int = 1234
) -> list[Any]:
    """Spawn ``world_size`` processes running ``fn(*args)`` after bring-up; return each rank's result.

    ``fn`` must be a module-level function (it is pickled into the children).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(
                _worker,
                args=(world_size, free_port(), tp, pp, seed, out_dir, fn, args),
                nprocs=world_size,
                join=True,
                start_method=START_METHOD,
            )
        finally:
            _echo_logs(out_dir, world_size)
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)
        ]
