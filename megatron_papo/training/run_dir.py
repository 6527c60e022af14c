"""What a run keeps in its directories besides metrics and checkpoints: who owns them, what each launch
was started with, and nothing left from a crashed launch.

- ``run.lock`` in the output and the checkpoint directory: the host, pid and SLURM job of the run using
  them. A second run is refused while that process lives; a lock whose process is gone (same host, no
  such pid; or an earlier launch of the same SLURM job, i.e. before a requeue) is taken over with a
  warning. A lock from another host cannot be checked and is refused: remove it by hand once that run is
  gone.
- ``config.yaml``: the current launch's config; ``launches/NNN.yaml``: every launch's, numbered, with a
  header comment saying when, where and from which step it started (each loads as a config file).
- ``vllm_weights/``: the weight syncs for vLLM servers; an earlier launch's are removed at the start
  (versions restart with each launch, so none is reused).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import time
from typing import Any

import yaml

from megatron_papo.training.durable import fsync_path, write_text_durably

LOCK_FILE = "run.lock"
LAUNCHES = "launches"
WEIGHT_SYNC_DIR = "vllm_weights"

logger = logging.getLogger(__name__)


class RunDirBusy(RuntimeError):
    """Another live run holds the directory."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _slurm_launch() -> str | None:
    """This launch of a SLURM job: its id and restart count (a requeue increments the count)."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}/{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holder_alive(holder: dict[str, Any]) -> bool:
    """Whether the run recorded in a lock may still be running."""
    slurm, mine = holder.get("slurm"), _slurm_launch()
    if slurm and mine and slurm != mine and slurm.split("/")[0] == mine.split("/")[0]:
        return False  # an earlier launch of this very job: SLURM requeues a job only once it has ended
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    return isinstance(pid, int) and pid > 0 and pid != os.getpid() and _pid_alive(pid)


def _read_lock(path: str) -> dict[str, Any]:
    """A lock's record; an unreadable one (a crash while writing it) as a record of no process here."""
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):
        holder = None
    return holder if isinstance(holder, dict) else {"host": socket.gethostname(), "pid": None}


class RunLock:
    """The ``run.lock`` files of ``dirs`` (each directory once), held from ``acquire()`` until
    ``release()`` or the process's exit."""

    def __init__(self, dirs: list[str]) -> None:
        self.paths = [os.path.join(d, LOCK_FILE) for d in dict.fromkeys(os.path.realpath(d) for d in dirs)]
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "slurm": _slurm_launch()}
        self.held: list[str] = []

    def acquire(self) -> None:
        """Take every lock or none; ``RunDirBusy`` names the live holder."""
        self.record["started"] = _now()
        try:
            for path in self.paths:
                self._take(path)
                self.held.append(path)
        except BaseException:
            self.release()
            raise
        atexit.register(self.release)

    def _take(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                if holder_alive(holder):
                    raise RunDirBusy(
                        f"{os.path.dirname(path)} is in use by another run: {path} holds host "
                        f"{holder.get('host')}, pid {holder.get('pid')} (SLURM job {holder.get('slurm')}, "
                        f"started {holder.get('started')}); wait for it to end, or remove {path} if that "
                        "process is gone"
                    ) from None
                if _read_lock(path) == holder:  # not taken over by another starter meanwhile
                    logger.warning("taking over the stale lock %s of a run that is gone: %s", path, holder)
                    os.remove(path)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.record, f)
                f.flush()
                os.fsync(f.fileno())
            fsync_path(os.path.dirname(path))
            return

    def release(self) -> None:
        """Remove the locks this run still holds (idempotent)."""
        for path in self.held:
            if _read_lock(path) == self.record:
                os.remove(path)
        self.held = []


def record_launch(out_dir: str, config: dict[str, Any], resumed_from: int) -> str:
    """Write this launch's ``config`` as ``out_dir/config.yaml`` and keep it as the next
    ``launches/NNN.yaml``; returns the latter."""
    launches = os.path.join(out_dir, LAUNCHES)
    os.makedirs(launches, exist_ok=True)
    number = 1 + sum(name.endswith(".yaml") for name in os.listdir(launches))
    start = f"resumed from step {resumed_from}" if resumed_from else "fresh start"
    header = f"# launch {number}: {_now()} on {socket.gethostname()} (pid {os.getpid()}), {start}\n"
    text = header + yaml.safe_dump(config, sort_keys=False)
    path = os.path.join(launches, f"{number:03d}.yaml")
    write_text_durably(path, text)
    write_text_durably(os.path.join(out_dir, "config.yaml"), text)
    return path


def weight_sync_dir(out_dir: str) -> str:
    """Where a run under ``out_dir`` writes the weight syncs of its vLLM servers."""
    return os.path.join(out_dir, WEIGHT_SYNC_DIR)


def clean_weight_syncs(out_dir: str) -> bool:
    """Remove the weight syncs an earlier launch left under ``out_dir``; whether there were any."""
    path = weight_sync_dir(out_dir)
    if not os.path.exists(path):
        return False
    shutil.rmtree(path)
    return True
