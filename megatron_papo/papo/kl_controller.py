"""The coefficient of the reference-KL reward penalty (``algorithm.ref_kl_in_reward``).

As the reference code (verl / EasyR1, after TRL): ``fixed`` keeps ``ref_kl_coef``; ``adaptive``
(Ziegler et al. 2019, arXiv 1909.08593) moves it towards a target KL per token after every step:

    error = clip(kl / target - 1, -0.2, 0.2);    coef *= 1 + error * responses / horizon
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_papo.papo.config import AlgorithmConfig


@dataclass
class KLController:
    coef: float
    adaptive: bool = False
    target: float = 0.1
    horizon: float = 10000.0

    @classmethod
    def from_config(cls, cfg: AlgorithmConfig) -> KLController:
        return cls(
            cfg.ref_kl_coef, cfg.ref_kl_controller == "adaptive", cfg.ref_kl_target, cfg.ref_kl_horizon
        )

    def update(self, current_kl: float, responses: int) -> None:
        """After a step whose ``responses`` responses had mean per-token KL ``current_kl``."""
        if self.adaptive:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * responses / self.horizon

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])
