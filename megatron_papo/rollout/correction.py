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
