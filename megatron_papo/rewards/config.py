"""The ``reward`` section of the config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RewardConfig:
    """``function``: a registered name (``papo_default``, ``accuracy_only``) or ``"module.path:function"`` /
    ``"path/to/file.py:function"`` taking ``(response, answer, answer_type)`` and returning a
    ``RewardOutput`` or a mapping with ``score``, ``accuracy`` and ``format``. ``format_weight`` w gives
    ``papo_default``'s R = (1 - w) * accuracy + w * format (reference: 0.1).

    Bounds (``megatron_papo.rewards.pool``): a response is cut to its first ``max_response_chars``
    characters before any parser sees it, and graded in one of ``workers`` worker processes per rank; one
    not graded within ``timeout_s`` seconds has its worker killed and scores 0 (``reward/timeouts``).
    """

    function: str = "papo_default"
    format_weight: float = 0.1
    max_response_chars: int = 16384
    timeout_s: float = 10.0
    workers: int = 1

    def __post_init__(self) -> None:
        if not self.function.strip():
            raise ValueError("reward.function must name a registered reward or 'module:function'")
        if not 0.0 <= self.format_weight <= 1.0:
            raise ValueError(f"reward.format_weight must be in [0, 1], got {self.format_weight}")
        for name in ("max_response_chars", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"reward.{name} must be >= 1, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {self.timeout_s}")
