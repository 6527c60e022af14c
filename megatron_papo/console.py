"""What a run prints: its own lines on the console, the libraries' start-up noise in a log file.

megatron-core and transformers report their set-up (megatron-core's DDP and optimizer config dumps, the
"Transformer Engine and Apex are not installed" warnings, ...) through ``logging`` and ``warnings``.
``quiet_libraries()``, called first by the CLI, holds those records in memory (``quiet_transformers()``
reroutes transformers' own logger too, for the commands that load a model); ``log_to_file(path)``, once
the run's output directory is known, writes them and everything after them to ``path`` (one file per
rank, ``run_log_path``). megatron-papo's own warnings (its ``megatron_papo.*`` loggers) still reach the
console. With ``MEGATRON_PAPO_DEBUG=1`` nothing is rerouted: every record goes to the console.
"""

from __future__ import annotations

import logging
import os
import sys
from logging.handlers import MemoryHandler

DEBUG_ENV = "MEGATRON_PAPO_DEBUG"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def debug_mode() -> bool:
    """``MEGATRON_PAPO_DEBUG`` is set: tracebacks and library logs on the console."""
    return bool(os.environ.get(DEBUG_ENV))


def run_log_path(out_dir: str, rank: int) -> str:
    """Where rank ``rank`` of a run writes its library log."""
    return os.path.join(out_dir, "logs", f"rank{rank}.log")


def quiet_libraries() -> None:
    """Hold library log records and Python warnings until ``log_to_file`` (``debug_mode``: print them)."""
    if debug_mode():
        logging.basicConfig(level=logging.INFO, format=FORMAT)
        return
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    # no target yet: the handler keeps every record until log_to_file gives it one
    root.addHandler(MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1))
    logging.captureWarnings(True)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("megatron_papo").addHandler(console)


def quiet_transformers() -> None:
    """Send transformers' records where ``quiet_libraries`` sends the others, without its progress bars
    (nothing in ``debug_mode``)."""
    if debug_mode():
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()  # transformers' records reach the root logger's handlers instead
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()


def log_to_file(path: str) -> None:
    """Write the held records, and every later one, to ``path`` (appending); nothing in ``debug_mode``."""
    if debug_mode():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    file = logging.FileHandler(path, encoding="utf-8")
    file.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for held in [h for h in root.handlers if isinstance(h, MemoryHandler)]:
        held.setTarget(file)
        held.close()  # flushes into the file
        root.removeHandler(held)
    root.addHandler(file)
