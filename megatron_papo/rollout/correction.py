"""Rollout engine vs trainer numerics: the log-prob mismatch and truncated importance sampling (TIS).

An engine such as vLLM samples with its own kernels, so the probability it gave a sampled token differs
from the trainer's for the same weights. ``logprob_mismatch`` measures the gap each step; with
``rollout.tis_cap`` the policy-gradient term of each token is weighted by ``min(pi_old / pi_rollout, cap)``
(truncated importance sampling, Yao et al. 2025, as in verl), which corrects for sampling from the
engine's distribution rather than the trainer's while bounding the variance.
"""

from __future__ import annotations

import torch


def logprob_mismatch(trainer_lp: torch.Tensor, rollout_lp: torch.Tensor, mask: torch.Tensor) -> float:
    """mean |lp_trainer - lp_rollout| over the response tokens ``mask`` > 0; all three [N, L]."""
    diff = (trainer_lp.double() - rollout_lp.double()).abs() * mask
    return float(diff.sum() / mask.sum().clamp(min=1))


def truncated_importance_weights(
    trainer_lp: torch.Tensor, rollout_lp: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Per-token ``min(exp(trainer_lp - rollout_lp), cap)`` [N, L], 0 on padding (``mask`` == 0)."""
    ratio = torch.exp((trainer_lp - rollout_lp).float()).clamp(max=cap)
    return torch.where(mask > 0, ratio, torch.zeros_like(ratio))


def importance_weight_stats(
    trainer_lp: torch.Tensor, rollout_lp: torch.Tensor, mask: torch.Tensor, cap: float | None
) -> dict[str, float]:
    """The untruncated per-token weights ``pi_old / pi_rollout`` over the response tokens ``mask`` > 0 (all
    three [N, L]): mean, min and max, and with a ``cap`` the share of tokens above it (the ones TIS cuts)."""
    ratio = torch.exp(trainer_lp.double() - rollout_lp.double())[mask > 0]
    if ratio.numel() == 0:
        return {}
    stats = {
        "rollout/is_weight_mean": float(ratio.mean()),
        "rollout/is_weight_min": float(ratio.min()),
        "rollout/is_weight_max": float(ratio.max()),
    }
    if cap is not None:
        stats["rollout/is_weight_capped"] = float((ratio > cap).double().mean())
    return stats
