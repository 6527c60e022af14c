"""VPPO, Visually-Perceptive Policy Optimization (arXiv 2510.09285), as its official code computes it.

Once per optimizer step, without gradient, from the step's passes with the pre-update policy (old
log-probs with the original image, ``masked_log_probs`` with the masked one), per response token t of
rollout i (response mask m):

    d_t     = clamp(lp_mask - lp_old, -20, 20)
    S_t     = clamp(exp(d) - d - 1, 0, 10)                  visual dependency: k3 of KL(pi(.|I) || pi(.|I'))
    keep_t  = 1 on the ceil(k * T_i) tokens of i with the largest S_t             (TGF, k = vppo_top_k)
    Sbar_i  = mean_t S_t
    n_i     = clamp((Sbar_i - min_j Sbar_j) / (max_j Sbar_j - min_j Sbar_j), 0, 1)
    alpha_i = beta_min + (1 - beta_min) * n_i / (mean_j n_j + 1e-8)              (TAS, dynamic beta_max)

and alpha_i = 1 when max - min <= 1e-6 or fewer than two responses. Per micro-batch, with gradient:

    loss = agg(keep_t * pg_t(alpha_i A_i)) + c_H * agg(-lp) [+ ref-KL]

``pg`` the clipped surrogate (``pieces.policy_gradient``), ``agg`` over ALL response tokens (the kept
tokens' sum is not divided by their count); c_H = ``vppo_entropy_coef``. Defaults and sources:
``docs/objectives.md``.

Scope of min / max / mean (``vppo_tas_scope``). ``batch`` (default): over the whole mini-batch on all DP
ranks (collectives over the DP group), so alpha does not depend on DP size or micro-batch size and its
mean over the mini-batch is 1 (the paper: "within batch B"). ``rank_micro_batch``: the official code, min
and max over this DP rank's share of the mini-batch and the mean over each micro-batch, so alpha averages
to 1 in every micro-batch and changes with the parallel layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from megatron_papo.objectives.pieces import (
    Aggregation,
    TokenStats,
    entropy_values,
    local_mean,
    policy_gradient,
    reference_kl_term,
    response_values,
    token_stats,
    top_p_by_count,
)
from megatron_papo.objectives.registry import (
    LossContext,
    LossInputs,
    Objective,
    Prepared,
    StepTokens,
    register_objective,
)
from megatron_papo.papo.config import AlgorithmConfig


@dataclass(frozen=True)
class VppoPrepared(Prepared):
    """dependency: S_t [N, L] (0 on padding); keep: the TGF mask [N, L]; alpha: the TAS factor [N]."""

    dependency: torch.Tensor
    keep: torch.Tensor
    alpha: torch.Tensor


def visual_dependency(
    cfg: AlgorithmConfig, old_log_probs: torch.Tensor, masked_log_probs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """S_t [N, L] from the pre-update log-probs of the sampled tokens with the original and the masked
    image ([N, L] each; ``mask`` [N, L] response tokens), float64, 0 on padding."""
    old = response_values("old_log_probs", old_log_probs.double(), mask, torch.zeros_like(mask))
    d = (response_values("masked_log_probs", masked_log_probs, mask, old) - old).clamp(
        -cfg.log_ratio_clamp, cfg.log_ratio_clamp
    )
    return (torch.exp(d) - d - 1).clamp(0.0, cfg.vppo_dependency_clamp)


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    from megatron_papo.parallel.device import current_device  # megatron-core: not at config load

    out = x.to(current_device())
    dist.all_reduce(out, op=op, group=group)
    return out.to(x.device)


def trajectory_factors(
    cfg: AlgorithmConfig,
    mean_dependency: torch.Tensor,
    valid: torch.Tensor,
    micro_batch_size: int,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """alpha [N] (float64) from each response's mean dependency Sbar [N] (float64); ``valid`` [N]: the
    responses with tokens (the others get 1). ``group``: the DP group (``batch`` scope only)."""
    n = len(mean_dependency)
    if n % micro_batch_size:
        raise ValueError(f"{n} sequences do not split into micro-batches of {micro_batch_size}")
    per_rank = cfg.vppo_tas_scope == "rank_micro_batch"
    group = None if per_rank else group
    bounds = torch.stack(
        [-mean_dependency.where(valid, torch.inf).min(), mean_dependency.where(valid, -torch.inf).max()]
    )
    low, high = _all_reduce(bounds, dist.ReduceOp.MAX, group) * torch.tensor([-1.0, 1.0], dtype=bounds.dtype)
    normalized = ((mean_dependency - low) / (high - low)).clamp(0.0, 1.0).where(valid, 0.0)
    sums = torch.stack([valid.double().sum(), normalized.sum()])
    count, total = _all_reduce(sums, dist.ReduceOp.SUM, group)
    if count < 2 or not high - low > 1e-6:
        return torch.ones_like(mean_dependency)
    if cfg.vppo_beta_max is not None:
        top = torch.tensor(cfg.vppo_beta_max, dtype=normalized.dtype)
    else:
        mean = total / count
        if per_rank:  # the mean over each micro-batch
            rows = valid.view(-1, micro_batch_size).double().sum(-1).clamp(min=1)
            mean = normalized.view(-1, micro_batch_size).sum(-1) / rows
            mean = mean.repeat_interleave(micro_batch_size)
        top = cfg.vppo_beta_min + (1.0 - cfg.vppo_beta_min) / (mean + 1e-8)
    alpha = cfg.vppo_beta_min + normalized * (top - cfg.vppo_beta_min)
    return alpha.where(valid, 1.0)


def prepare_vppo(
    cfg: AlgorithmConfig, tokens: StepTokens, micro_batch_size: int, group: dist.ProcessGroup | None
) -> VppoPrepared:
    """S_t, the TGF mask and alpha for this rank's rows of one optimizer step (see the module doc)."""
    if tokens.masked_log_probs is None:
        raise ValueError(f"objective {cfg.objective} needs masked_log_probs (the step's masked-image pass)")
    mask = tokens.loss_mask.double()
    dependency = visual_dependency(cfg, tokens.old_log_probs, tokens.masked_log_probs, mask)
    lengths = mask.sum(-1)
    mean_dependency = dependency.sum(-1) / lengths.clamp(min=1)
    alpha = trajectory_factors(cfg, mean_dependency, lengths > 0, micro_batch_size, group)
    return VppoPrepared(dependency, top_p_by_count(dependency, mask, cfg.vppo_top_k), alpha)


def shaped_policy_gradient(
    cfg: AlgorithmConfig,
    inputs: LossInputs,
    ctx: LossContext,
    prepared: Prepared | None,
) -> tuple[TokenStats, Aggregation, torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's ``TokenStats``, ``Aggregation`` and VPPO's term agg(keep * pg(alpha A)) with its
    metrics (vppo/dependency: mean S_t; vppo/alpha_min, vppo/alpha_max; vppo/kept_fraction)."""
    x = token_stats(
        inputs.logits,
        inputs.labels,
        inputs.loss_mask,
        inputs.advantages,
        inputs.old_log_probs,
        ctx.temperature,
        inputs.masked_logits,
        inputs.masked_log_probs,
        cfg.masked_grad,
        inputs.packing,
    )
    if not isinstance(prepared, VppoPrepared) or prepared.keep.shape != x.mask.shape:
        raise ValueError(f"objective {cfg.objective} needs its prepare() rows of this micro-batch")
    keep = prepared.keep.to(x.mask) * x.mask
    alpha = prepared.alpha.to(x.lp)
    pg, metrics = policy_gradient(cfg, x, inputs.advantages.to(x.lp.dtype) * alpha, inputs.rollout_is_weights)
    pg = pg * keep
    agg = Aggregation.of(cfg, x.mask, ctx.counts)
    metrics |= x.metrics() | {
        "actor/pg_loss": local_mean(pg, x.mask),
        "vppo/dependency": local_mean(prepared.dependency.to(x.mask), x.mask),
        "vppo/alpha_min": alpha.min().detach(),
        "vppo/alpha_max": alpha.max().detach(),
        "vppo/kept_fraction": local_mean(keep, x.mask),
    }
    return x, agg, agg(pg), metrics


@register_objective("vppo")
class Vppo(Objective):
    """VPPO: the shaped, filtered policy gradient plus its entropy penalty (and the reference KL when
    ``ref_kl_coef`` > 0 in the loss); PAPO's terms must be off (``papo_vppo`` adds them)."""

    papo_terms: ClassVar[bool] = False

    def __init__(self, cfg: AlgorithmConfig) -> None:
        super().__init__(cfg)
        papo = [k for k in ("gamma", "eta1", "eta2", "use_sft_loss") if getattr(cfg, k)]
        if papo and not self.papo_terms:
            raise ValueError(
                f"objective {cfg.objective} has no PAPO terms, but {papo} are set (preset {cfg.name}): use "
                "algorithm.name=dapo (the VPPO recipe) or grpo, or objective papo_vppo"
            )

    @property
    def masked_log_probs_needed(self) -> bool:
        return True

    @property
    def old_log_probs_in_prepare(self) -> bool:
        return True  # S_t compares the old and the masked log-probs

    def prepare(
        self, tokens: StepTokens, micro_batch_size: int, group: dist.ProcessGroup | None
    ) -> VppoPrepared:
        return prepare_vppo(self.cfg, tokens, micro_batch_size, group)

    def loss(
        self, inputs: LossInputs, ctx: LossContext, prepared: Prepared | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        x, agg, loss, metrics = shaped_policy_gradient(cfg, inputs, ctx, prepared)
        if cfg.vppo_entropy_coef:
            loss = loss + cfg.vppo_entropy_coef * agg.entropy(entropy_values(cfg, x))
        if cfg.ref_kl_in_loss:
            term, ref_metrics = reference_kl_term(cfg, x, inputs.ref_log_probs, agg)
            loss = loss + cfg.ref_kl_coef * term
            metrics |= ref_metrics
        metrics["actor/loss"] = loss.detach()
        return loss, metrics
