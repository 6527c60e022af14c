"""Per-step metrics to the console (progress bar with ETA), a JSONL file, TensorBoard and the trackers."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from megatron_papo.training.trackers import InputImages, Tracker

# what the step line shows, each under a name that says what it is
CONSOLE_METRICS = {
    "reward/mean": "reward",
    "reward/accuracy": "accuracy",
    "reward/format": "format",
    "response/length": "response_len",
    "papo/kl_prc": "kl_prc",
    "papo/entropy_sample": "entropy",
    "papo/masked_entropy_sample": "masked_entropy",
    "actor/pg_clipfrac": "clip_frac",
    "actor/loss": "loss",
    "actor/grad_norm": "grad_norm",
    "eval/accuracy": "eval_accuracy",
    "eval/masked_accuracy": "eval_masked_accuracy",
    "perf/tokens_per_s": "tokens/s",
}


def read_metrics(path: str) -> list[dict[str, float]]:
    """The rows of a ``metrics.jsonl``; a line that is not JSON, or no rows, raise naming the file."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON line ({e})") from e
    if not rows:
        raise ValueError(f"{path}: no metrics rows")
    return rows


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Writes ``metrics.jsonl`` and TensorBoard events under ``out_dir`` and hands each step to the
    ``trackers``; prints one line per step.

    Only rank 0 should build one. ``log(step, metrics, images)`` takes plain floats, and the input images
    when ``wants_images(step)``.
    """

    def __init__(
        self,
        out_dir: str,
        total_steps: int,
        first_step: int = 0,
        tensorboard: bool = True,
        stream: TextIO = sys.stdout,
        trackers: Sequence[Tracker] = (),
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
        self.stream, self.trackers = stream, list(trackers)
        self._start = time.monotonic()

    def wants_images(self, step: int) -> bool:
        """Whether a tracker logs input images at ``step``."""
        return any(t.wants_images(step) for t in self.trackers)

    def log(self, step: int, metrics: dict[str, float], images: Sequence[InputImages] = ()) -> None:
        clean = {k: float(v) for k, v in sorted(metrics.items())}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        for tracker in self.trackers:
            tracker.log(step, clean, list(images) if tracker.wants_images(step) else [])
        self.stream.write(self._line(step, clean) + "\n")
        self.stream.flush()

    def _line(self, step: int, metrics: dict[str, float]) -> str:
        done = step - self.first_step
        elapsed = time.monotonic() - self._start
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        width = 20
        filled = int(width * step / max(self.total_steps, 1))
        bar = "#" * filled + "." * (width - filled)
        shown = " ".join(f"{name}={metrics[k]:.4g}" for k, name in CONSOLE_METRICS.items() if k in metrics)
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
        for tracker in self.trackers:
            tracker.close()
