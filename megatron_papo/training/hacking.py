"""The KL_prc-hacking detector (spec: "Failure mode to detect").

Hacking looks like: KL_prc explodes, the high-side clip fraction rises, both entropies rise, then the
reward falls while outputs fill with irrelevant text. The detector takes a baseline over the first
``warmup_steps`` steps (their mean) and flags a step when, against that baseline, KL_prc has grown by
``kl_factor``, both entropies by ``entropy_factor`` and the high-side clip fraction by ``clip_delta``
(absolute). ``patience`` flagged steps in a row trigger the configured action (warn or stop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_papo.config_io import check_choices

# the pair of entropies the default rule was calibrated on (docs/results.md): the exact entropy with the
# original image and the sample estimate -mean(lp_mask) with the masked one (all a default run computes)
KEYS = ("papo/kl_prc", "papo/entropy", "papo/masked_entropy_sample", "actor/pg_clipfrac_high")


@dataclass
class HackingDetectorConfig:
    """The ``logging.hacking_detector`` section."""

    enabled: bool = True
    action: Literal["warn", "stop"] = "warn"
    warmup_steps: int = 3
    kl_factor: float = 5.0
    entropy_factor: float = 1.2
    clip_delta: float = 0.02
    patience: int = 2

    def __post_init__(self) -> None:
        check_choices(self, "logging.hacking_detector")
        if self.warmup_steps < 1 or self.patience < 1 or self.kl_factor <= 1 or self.entropy_factor < 1:
            raise ValueError(
                "hacking_detector: need warmup_steps >= 1, patience >= 1, kl_factor > 1 and "
                "entropy_factor >= 1"
            )


@dataclass
class HackingDetector:
    cfg: HackingDetectorConfig
    _history: list[dict[str, float]] = field(default_factory=list)
    _streak: int = 0

    def update(self, metrics: dict[str, float]) -> bool:
        """Feed one step's metrics; True when the rule fires (``patience`` suspicious steps in a row)."""
        if not self.cfg.enabled or any(k not in metrics for k in KEYS):
            return False
        if len(self._history) < self.cfg.warmup_steps:
            self._history.append({k: metrics[k] for k in KEYS})
            return False
        base = {k: sum(h[k] for h in self._history) / len(self._history) for k in KEYS}
        suspicious = (
            metrics["papo/kl_prc"] > self.cfg.kl_factor * max(base["papo/kl_prc"], 1e-8)
            and metrics["papo/entropy"] > self.cfg.entropy_factor * base["papo/entropy"]
            and metrics["papo/masked_entropy_sample"]
            > self.cfg.entropy_factor * base["papo/masked_entropy_sample"]
            and metrics["actor/pg_clipfrac_high"] > base["actor/pg_clipfrac_high"] + self.cfg.clip_delta
        )
        self._streak = self._streak + 1 if suspicious else 0
        return self._streak >= self.cfg.patience

    def state_dict(self) -> dict:
        return {"history": list(self._history), "streak": self._streak}

    def load_state_dict(self, state: dict) -> None:
        self._history, self._streak = list(state["history"]), int(state["streak"])
