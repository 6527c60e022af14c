"""Per-step metrics to the console (progress bar with ETA), a JSONL file and TensorBoard."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import TextIO

CONSOLE_KEYS = (
    "reward/mean",
    "reward/accuracy",
    "reward/format",
    "response/length",
    "papo/kl_prc",
    "papo/entropy_sample",
    "papo/masked_entropy_sample",
    "actor/pg_clipfrac",
    "actor/grad_norm",
    "perf/tokens_per_s",
)


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Writes ``metrics.jsonl`` and TensorBoard events under ``out_dir``; prints one line per step.

    Only rank 0 should build one. ``log(step, metrics)`` takes plain floats.
    """

    def __init__(
        self,
        out_dir: str,
        total_steps: int,
        first_step: int = 0,
        tensorboard: bool = True,
        stream: TextIO = sys.stdout,
    ) -> None:
        os.makedirs(out_dir, exist_ok=True)
        self.jsonl_path = os.path.join(out_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(out_dir, "tensorboard")
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(self.tb_dir)
        self.total_steps, self.first_step = total_steps, first_step
        self.stream = stream
        self._start = time.monotonic()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in sorted(metrics.items())}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        self.stream.write(self._line(step, clean) + "\n")
        self.stream.flush()

    def _line(self, step: int, metrics: dict[str, float]) -> str:
        done = step - self.first_step
        elapsed = time.monotonic() - self._start
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        width = 20
        filled = int(width * step / max(self.total_steps, 1))
        bar = "#" * filled + "." * (width - filled)
        shown = " ".join(f"{k.split('/')[-1]}={metrics[k]:.4g}" for k in CONSOLE_KEYS if k in metrics)
        return (
            f"[{bar}] step {step}/{self.total_steps} elapsed {_fmt_duration(elapsed)} "
            f"eta {_fmt_duration(eta)} | {shown}"
        )

    def message(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
