"""Rewards graded in worker processes, each response under a hard timeout: a reward never stalls a step.

``RewardPool.grade`` hands each (response, answer, answer_type) to one of ``reward.workers`` worker
processes (forked on first use, so they start at once with the reward function already imported), the
response cut to its first ``reward.max_response_chars`` characters. A worker that has not answered
``reward.timeout_s`` seconds after it got a response is killed (SIGKILL) and replaced; the response
scores 0 (score, accuracy and format) and counts in ``reward/timeouts``. A worker that dies counts the
same. An exception of the reward function itself (a wrong return type, a bug) stops the run, as it would
in the trainer's process. The workers ignore SIGTERM and SIGUSR1, which a scheduler sends to every process
of a job: the trainer stops at its next step boundary, with the step's rewards graded.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.util
import time
from collections import deque
from multiprocessing.connection import Connection, wait

from megatron_papo.rewards.config import RewardConfig
from megatron_papo.rewards.registry import RewardFn, RewardOutput, build_reward_fn
from megatron_papo.training.preemption import ignore_exit_signals

Item = tuple[str, str, str]  # response, answer, answer_type
ZERO = RewardOutput(0.0, 0.0, 0.0)


class RewardError(RuntimeError):
    """The reward function raised on a response."""


def _serve(conn: Connection, fn: RewardFn) -> None:
    """A worker: grade each item received, send back ("ok", RewardOutput) or ("error", message)."""
    # a job-wide SIGTERM / SIGUSR1 (srun, scancel --signal, a preempting scheduler) is the trainer's to act
    # on: it finishes the step, grading included, and saves; the pool stops its workers with SIGKILL
    ignore_exit_signals()
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", fn(*item)))
        except Exception as e:  # handed to the trainer, which raises it
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Worker:
    """One worker process; ``task``: the index of the item it grades (None: idle) until ``deadline``."""

    def __init__(self, fn: RewardFn) -> None:
        self.conn, child = mp.Pipe()
        self.proc = mp.get_context("fork").Process(target=_serve, args=(child, fn), daemon=True)
        self.proc.start()
        child.close()
        self.task: int | None = None
        self.deadline = 0.0

    def give(self, index: int, item: Item, timeout_s: float) -> None:
        self.conn.send(item)
        self.task, self.deadline = index, time.monotonic() + timeout_s

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


class RewardPool:
    """The configured reward function (``build_reward_fn``) behind ``cfg.workers`` worker processes."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        self.fn = build_reward_fn(cfg)  # a bad reward.function fails here, before any step
        self.workers: list[_Worker] = []
        self.time_s = 0.0
        self.timeouts = 0
        # the workers ignore the SIGTERM with which multiprocessing's exit handler stops daemon processes
        # (it would then wait for them forever): a finalizer it runs first kills them
        mp.util.Finalize(None, self.close, exitpriority=10)

    def start(self) -> None:
        """Fork the workers unless they run (``grade`` does it first; call it before this process starts
        other threads: a fork beside a running thread may copy a lock it holds)."""
        if not self.workers:
            self.workers = [_Worker(self.fn) for _ in range(self.cfg.workers)]

    def grade(self, items: list[Item]) -> list[RewardOutput]:
        """The reward of each item, in order; items graded concurrently, each within ``cfg.timeout_s``."""
        start = time.monotonic()
        self.start()
        todo = deque(enumerate(items))
        out = [ZERO] * len(items)
        while True:
            for worker in self.workers:
                if worker.task is None and todo:
                    index, (response, answer, answer_type) = todo.popleft()
                    item = (response[: self.cfg.max_response_chars], answer, answer_type)
                    worker.give(index, item, self.cfg.timeout_s)
            busy = [w for w in self.workers if w.task is not None]
            if not busy:
                break
            timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.conn for w in busy], timeout)
            for i, worker in enumerate(self.workers):
                if worker.task is not None and (worker.conn in ready or time.monotonic() >= worker.deadline):
                    self._collect(i, worker, worker.conn in ready, out)
        self.time_s += time.monotonic() - start
        return out

    def _collect(self, i: int, worker: _Worker, answered: bool, out: list[RewardOutput]) -> None:
        """``worker``'s answer into ``out``; a worker past its deadline or dead is replaced (reward 0)."""
        index, worker.task = worker.task, None
        try:
            kind, value = worker.conn.recv() if answered else ("timeout", None)
        except EOFError:
            kind, value = "died", None
        if kind == "ok":
            out[index] = value
            return
        if kind == "error":
            self.close()
            raise RewardError(f"reward function {self.cfg.function} failed on a response: {value}")
        worker.kill()
        self.workers[i] = _Worker(self.fn)
        self.timeouts += 1

    def take_stats(self) -> dict[str, float]:
        """``perf/reward_s`` (grading time) and ``reward/timeouts`` since the last call."""
        stats = {"perf/reward_s": self.time_s, "reward/timeouts": float(self.timeouts)}
        self.time_s, self.timeouts = 0.0, 0
        return stats

    def close(self) -> None:
        """Stop the workers (started again by the next ``grade``)."""
        for worker in self.workers:
            worker.kill()
        self.workers = []
