"""Whether a run learned: the first steps of its reward and accuracy against the last, measured against
the step-to-step noise, and its test accuracy before against after training.

A step's reward is a mean over a few dozen sampled responses, so it jumps by several points between
steps. The noise of a window mean is estimated from successive differences (robust to a trend): the
per-step SD is ``sd(x[t+1] - x[t]) / sqrt(2)``, the SE of the difference of two ``window``-step means
``sd * sqrt(2 / window)``. An evaluation's noise is binomial: ``sqrt(p (1 - p) / prompts)`` per
evaluation, the two in quadrature.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass

TRAIN_KEYS = {"reward/mean": "reward", "reward/accuracy": "accuracy"}
EVAL_KEY, EVAL_PROMPTS_KEY = "eval/accuracy", "eval/prompts"


@dataclass(frozen=True)
class Change:
    """``name`` went from ``first`` to ``last``; ``noise``: the SE of that difference."""

    name: str
    first: float
    last: float
    noise: float
    where: str  # which steps ``first`` and ``last`` summarize

    @property
    def ratio(self) -> float:
        """The change in units of its noise (inf when the noise is 0 and the change is not)."""
        delta = self.last - self.first
        if self.noise > 0:
            return delta / self.noise
        return math.copysign(math.inf, delta) if delta else 0.0

    def line(self) -> str:
        return (
            f"  {self.name:<14} {self.first:.3f} -> {self.last:.3f} ({self.last - self.first:+.3f}, "
            f"{self.ratio:+.1f} x its noise {self.noise:.3f}; {self.where})"
        )


def window_change(rows: list[dict[str, float]], key: str, name: str, window: int) -> Change | None:
    """Mean of ``key`` over the first ``window`` steps against the last ``window`` (``None`` with fewer
    than ``2 * window`` steps holding it)."""
    values = [r[key] for r in rows if key in r and r["step"] > 0]
    if window < 2 or len(values) < 2 * window:
        return None
    steps = statistics.stdev([b - a for a, b in itertools.pairwise(values)]) / math.sqrt(2)
    n = len(values)
    return Change(
        name,
        statistics.fmean(values[:window]),
        statistics.fmean(values[-window:]),
        steps * math.sqrt(2 / window),
        f"steps 1-{window} vs {n - window + 1}-{n}",
    )


def eval_change(rows: list[dict[str, float]]) -> Change | None:
    """Test accuracy at the first evaluation against the last (``None`` with fewer than two)."""
    evals = [r for r in rows if EVAL_KEY in r and EVAL_PROMPTS_KEY in r]
    if len(evals) < 2:
        return None
    first, last = evals[0], evals[-1]
    variance = sum(r[EVAL_KEY] * (1 - r[EVAL_KEY]) / max(r[EVAL_PROMPTS_KEY], 1) for r in (first, last))
    return Change(
        "test accuracy",
        first[EVAL_KEY],
        last[EVAL_KEY],
        math.sqrt(variance),
        f"step {first['step']:.0f} vs {last['step']:.0f}, {last[EVAL_PROMPTS_KEY]:.0f} prompts",
    )


def progress_lines(rows: list[dict[str, float]], window: int = 5) -> list[str]:
    """The console summary of what a run learned (empty when it is too short to say)."""
    changes = [window_change(rows, key, name, window) for key, name in TRAIN_KEYS.items()]
    changes = [c for c in changes + [eval_change(rows)] if c is not None]
    if not changes:
        return []
    return ["learning (first vs last; noise = SE of the difference):"] + [c.line() for c in changes]
