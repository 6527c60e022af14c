"""How far a step's rollouts lag behind the weights it trains from (``rollout.max_staleness``).

A rollout's ``weight_version`` is the number of optimizer steps behind the weights it was sampled with; step
``k`` trains from version ``k - 1``, so its rollouts' staleness is ``k - 1 - weight_version``: 0 in the
synchronous loop, at most ``max_staleness`` with rollouts generated ahead (``training.rollout_producer``).
"""

from __future__ import annotations


class StaleRolloutError(RuntimeError):
    """A step got rollouts of an unknown version, or more than ``rollout.max_staleness`` versions old."""


def staleness_metrics(versions: list[int | None], step: int, max_staleness: int) -> dict[str, float]:
    """``rollout/staleness`` (mean, max) and ``rollout/weight_version`` (min, max) of step ``step``'s
    rollouts, their ``versions`` one per sample; raises ``StaleRolloutError`` for a version that is unknown,
    from the future or more than ``max_staleness`` behind."""
    known = [v for v in versions if v is not None]
    if not known or len(known) != len(versions):
        raise StaleRolloutError(f"step {step}: rollouts without a weight version")
    lags = [step - 1 - v for v in known]
    if min(lags) < 0 or max(lags) > max_staleness:
        raise StaleRolloutError(
            f"step {step} trains from version {step - 1} and got rollouts of versions {min(known)}.."
            f"{max(known)}: more than rollout.max_staleness={max_staleness} behind, or ahead"
        )
    return {
        "rollout/staleness": sum(lags) / len(lags),
        "rollout/staleness_max": float(max(lags)),
        "rollout/weight_version_min": float(min(known)),
        "rollout/weight_version_max": float(max(known)),
    }
