"""Stopping a run early and resumably: on SIGTERM / SIGUSR1, or when a wall-clock budget is spent.

A signal handler only records the signal; at the next step boundary every rank all-reduces what it saw
(``EarlyExit.reason``), so all ranks stop at the same step even when one of them alone was signalled
(``srun --signal``, ``scancel --signal``, a preempting scheduler). The loop then saves a checkpoint and the
process exits with ``EXIT_STOPPED_EARLY`` (75, ``EX_TEMPFAIL``: try again), which the SLURM scripts
answer by requeueing the job; ``checkpoint.resume: auto`` continues it. ``trainer.exit_after_minutes``
stops the same way once that many minutes have passed since the start (Megatron-LM's
``--exit-duration-in-mins``).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_papo.parallel.device import current_device

EXIT_STOPPED_EARLY = 75
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StoppedEarly(Exception):
    """The run stopped before its last step, after saving a checkpoint at ``step``."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(
            f"stopped at step {step} ({reason}) after saving its checkpoint; the run continues with "
            f"--resume or checkpoint.resume=auto (exit status {EXIT_STOPPED_EARLY})"
        )
        self.step, self.reason = step, reason


def ignore_exit_signals(_worker_id: int = 0) -> None:
    """Ignore ``EXIT_SIGNALS``: in helper processes (DataLoader workers), as a job-wide signal is the
    trainer's to act on; and in the trainer once it exits with ``EXIT_STOPPED_EARLY``, as ``srun
    --kill-on-bad-exit`` sends SIGTERM to the ranks still exiting once the first has, and Python's
    shutdown restores the default (fatal) action of a signal with a handler, but keeps an ignored one."""
    for sig in EXIT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class EarlyExit:
    """Records ``EXIT_SIGNALS`` from construction on; ``reason()`` (a collective) says whether to stop.

    ``budget_minutes``: 0 for no wall-clock budget; ``clock``: seconds, for tests.
    """

    def __init__(self, budget_minutes: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget_s, self.clock = budget_minutes * 60, clock
        self.start = clock()
        self.received = 0
        for sig in EXIT_SIGNALS:
            signal.signal(sig, self._record)

    def _record(self, signum: int, _frame: object) -> None:
        self.received = signum

    def reason(self) -> str | None:
        """Why every rank stops now (a signal some rank got, or the spent budget), or None; all ranks
        call it at the same point and get the same answer."""
        over = bool(self.budget_s) and self.clock() - self.start >= self.budget_s
        seen = torch.tensor([self.received, int(over)], dtype=torch.int64, device=current_device())
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        signum, over = int(seen[0]), bool(seen[1])
        if signum:
            return f"{signal.Signals(signum).name} received"
        if over:
            return f"trainer.exit_after_minutes={self.budget_s / 60:g} reached"
        return None
