"""Advantages: GRPO group normalisation, DAPO's dynamic-sampling filter, the soft overlong punishment and
the reference-KL reward penalty.

Responses are laid out group by group: entries ``[g * n, (g + 1) * n)`` answer prompt ``g``.
"""

from __future__ import annotations

import torch


def _groups(name: str, values: torch.Tensor, group_size: int) -> torch.Tensor:
    """[groups * n] -> [groups, n] float64, refusing a ragged layout and non-finite values."""
    if values.dim() != 1 or group_size < 1 or len(values) % group_size:
        raise ValueError(f"{name}: expected [groups * {group_size}] values, got shape {tuple(values.shape)}")
    groups = values.double().view(-1, group_size)
    bad = ~torch.isfinite(groups).all(dim=1)
    if bad.any():
        raise ValueError(f"{name}: non-finite values in group(s) {bad.nonzero().flatten()[:8].tolist()}")
    return groups


def grpo_advantages(
    scores: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """A = (R - mean_group) / (std_group + eps) (unbiased std), or R - mean_group without std scaling.

    scores: [groups * n] -> advantages [groups * n] (float32). A group of one response gets 0.
    """
    s = _groups("scores", scores, group_size)
    centred = s - s.mean(dim=1, keepdim=True)
    if scale_by_std and group_size > 1:
        centred = centred / (s.std(dim=1, keepdim=True) + eps)
    return centred.flatten().float()


def dynamic_sampling_keep(
    accuracy: torch.Tensor, group_size: int, low: float = 0.01, high: float = 0.99
) -> torch.Tensor:
    """DAPO: keep groups whose mean accuracy is strictly between ``low`` and ``high`` -> [groups] bool."""
    mean = _groups("accuracy", accuracy, group_size).mean(dim=1)
    return (mean > low) & (mean < high)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment added to the reward: 0 up to ``max_length - buffer`` tokens, then
    falling linearly to ``-penalty`` at ``max_length``. lengths: [N] -> [N]."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must be in (0, {max_length}], got {buffer}")
    exceed = lengths.double() - (max_length - buffer)
    return torch.clamp(-exceed / buffer * penalty, max=0.0).float()


def kl_penalized_scores(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference-KL reward penalty: each response's score minus ``coef`` times its summed per-token
    KL (the reference's token-level rewards, summed by GRPO), and each response's mean per-token KL.

    scores: [N]; kl, mask: [N, L] (per-token KL to the reference, response tokens) -> ([N], [N]).
    """
    kl = torch.where(mask > 0, kl.double(), 0.0)
    tokens = mask.double().sum(-1).clamp(min=1)
    return (scores.double() - coef * kl.sum(-1)).float(), (kl.sum(-1) / tokens).float()
