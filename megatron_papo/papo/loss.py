"""The PAPO objective (``../shared/papo-spec.md``): what a researcher reads to know what is optimised.

Registered as ``algorithm.objective=papo`` (the default); built from ``megatron_papo.objectives.pieces``.

Per response token t (response mask m_t), with lp = log pi_theta(o_t | q, I), lp_mask = the same with the
masked image I_mask, lp_old the pre-update policy and A the response's advantage:

    r_t       = exp(clamp(lp - lp_old, -20, 20))
    pg_t      = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high))     (A < 0: min(pg_t, -A clip_dual))
    KL_prc_t  = exp(d) - d - 1,  d = lp_mask - lp                         (k3 of KL(pi || pi_mask), clamped)
    H_t       = -lp (reference estimator) or the exact vocabulary entropy

    loss = agg(pg) - gamma * agg(KL_prc) + eta1 * agg(H[pi]) + eta2 * agg(H[pi_mask]) + beta * agg(k3_ref)

KL_prc is *maximised* (the policy should depend on the image); the Double Entropy Loss keeps that from
being hacked. gamma and the eta's are scaled by the annealing factor. ``agg`` is the configured
aggregation (``token-mean`` by default). All inputs are per micro-batch on the last pipeline stage,
logits vocab-parallel; nothing gathers the vocabulary.

Reference details kept as defaults (each with a named alternative in ``AlgorithmConfig``): both entropy
terms are token-means whatever ``loss_agg_mode``; k1 / k2 KL_prc estimates are not clamped; top-p
selection keeps tokens >= the per-sample ``nanquantile`` of KL_prc at 1 - p (ties kept), before the
per-token clip, and the kept tokens' sum is divided by all response tokens. Extras, default off: an NLL
term on correct rollouts (``use_sft_loss``). Counts and sums accumulate in float32 (float64 for float64
logits) whatever the logits' dtype.

Global token-mean (``global_token_mean``): the reference averages each micro-batch on its own, so tokens
of short micro-batches weigh more. Here the caller passes ``global_counts``, the counts of the whole
mini-batch on all DP ranks (``TokenCounts``); each micro-batch's loss is its token SUM over that count,
and the caller multiplies it by ``num_microbatches * dp_size`` to undo megatron-core's averaging
(schedule and DDP; ``megatron_papo.training.update_loss``), so the summed gradients are those of one
token-mean (``tests/test_gpt_microstep.py`` checks it).
"""

from __future__ import annotations

import torch

from megatron_papo.objectives.pieces import (
    Aggregation,
    TokenCounts,
    TokenStats,
    entropy_values,
    local_mean,
    perception_kl,
    perception_term,
    policy_gradient,
    reference_kl,
    reference_kl_term,
    sft_term,
    token_stats,
)
from megatron_papo.objectives.registry import (
    LossContext,
    LossInputs,
    Objective,
    Prepared,
    register_objective,
)
from megatron_papo.papo.config import AlgorithmConfig
from megatron_papo.training.packing import Packing

__all__ = ["Papo", "papo_loss", "papo_terms", "reference_kl"]


def papo_loss(
    cfg: AlgorithmConfig,
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    *,
    masked_logits: torch.Tensor | None = None,
    masked_log_probs: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    sft_weights: torch.Tensor | None = None,
    temperature: float = 1.0,
    progress: float = 0.0,
    global_counts: TokenCounts | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    packing: Packing | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch and its metrics.

    logits: [b, s, vocab/tp] (with gradient); labels, loss_mask, old_log_probs: [b, s] (labels[t] is the
    token logits[t] scores; loss_mask 1 on response tokens; padding values are ignored); advantages: [b].
    The masked image comes as ``masked_logits`` [b, s, vocab/tp] (with gradient when ``cfg.masked_grad``,
    else detached; needed by the exact KL / entropy) or as precomputed ``masked_log_probs`` [b, s] (no
    gradient: the reference default). ``ref_log_probs`` [b, s] when the ref-KL loss term is on.
    ``sft_weights`` [b] (1 = correct rollout) with ``use_sft_loss``. ``progress`` in [0, 1] drives gamma
    annealing. ``global_counts``: see ``TokenCounts`` (the caller then scales the loss for the schedule's
    averaging). ``rollout_is_weights`` [b, s] (no gradient): per-token truncated importance weights
    pi_old / pi_rollout that multiply the policy-gradient term (``megatron_papo.rollout.correction``).
    ``packing``: logits (and masked_logits) are packed [t, vocab/tp] (``token_stats``); ``old_log_probs``
    None: on-policy (``token_stats``).

    Metrics (detached, means over this micro-batch's response tokens): those of ``policy_gradient``,
    papo/entropy and papo/entropy_sample (exact and -lp), and those of ``papo_terms``.
    """
    x = token_stats(
        logits,
        labels,
        loss_mask,
        advantages,
        old_log_probs,
        temperature,
        masked_logits,
        masked_log_probs,
        cfg.masked_grad,
        packing,
    )
    agg = Aggregation.of(cfg, x.mask, global_counts)
    pg, metrics = policy_gradient(cfg, x, advantages, rollout_is_weights)
    return papo_terms(cfg, x, agg, agg(pg), metrics | x.metrics(), ref_log_probs, sft_weights, progress)


def papo_terms(
    cfg: AlgorithmConfig,
    x: TokenStats,
    agg: Aggregation,
    loss: torch.Tensor,
    metrics: dict[str, torch.Tensor],
    ref_log_probs: torch.Tensor | None,
    sft_weights: torch.Tensor | None,
    progress: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PAPO's terms after the policy gradient, added to ``loss`` in the spec's order: eta1 * H[pi],
    -gamma * KL_prc, eta2 * H[pi_mask] (annealed together), the reference KL and the SFT term.

    Metrics added: papo/kl_prc (as it enters the loss), papo/masked_entropy_sample (-lp_mask) and
    papo/masked_entropy (exact, with masked logits), papo/gamma, actor/ref_kl, actor/sft_loss, actor/loss.
    """
    factor = cfg.anneal_factor(progress)
    if cfg.eta1:
        loss = loss + cfg.eta1 * factor * agg.entropy(entropy_values(cfg, x))
    if cfg.uses_masked_images:
        if x.lp_mask is None:
            raise ValueError(
                f"algorithm {cfg.name} (gamma={cfg.gamma}, eta2={cfg.eta2}) needs the masked image: "
                "pass masked_logits or masked_log_probs"
            )
        kl, kl_mask = perception_term(cfg, perception_kl(cfg, x.lp, x.lp_mask, x.exact_kl), x.mask)
        by_count = cfg.kl_prc_top_p is not None and cfg.kl_prc_top_p_select == "count"
        if cfg.gamma:
            loss = loss - cfg.gamma * factor * agg(kl, kl_mask, "kl_prc" if by_count else "response")
        if cfg.eta2:
            loss = loss + cfg.eta2 * factor * agg.entropy(entropy_values(cfg, x, masked=True))
        metrics["papo/kl_prc"] = local_mean(kl, kl_mask)
        metrics["papo/masked_entropy_sample"] = local_mean(-x.lp_mask, x.mask)
        if x.masked_entropy is not None:
            metrics["papo/masked_entropy"] = local_mean(x.masked_entropy, x.mask)
        metrics["papo/gamma"] = torch.tensor(cfg.gamma * factor)
    if cfg.ref_kl_in_loss:
        term, ref_metrics = reference_kl_term(cfg, x, ref_log_probs, agg)
        loss = loss + cfg.ref_kl_coef * term
        metrics |= ref_metrics
    if cfg.use_sft_loss:
        term, sft_metrics = sft_term(x, sft_weights, agg)
        loss = loss + cfg.sft_loss_coef * term
        metrics |= sft_metrics
    metrics["actor/loss"] = loss.detach()
    return loss, metrics


@register_objective("papo")
class Papo(Objective):
    """PAPO (and, by its coefficients, GRPO / DAPO): ``papo_loss``; needs: the ``Objective`` defaults."""

    def loss(
        self, inputs: LossInputs, ctx: LossContext, prepared: Prepared | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return papo_loss(
            self.cfg,
            inputs.logits,
            inputs.labels,
            inputs.loss_mask,
            inputs.advantages,
            inputs.old_log_probs,
            masked_logits=inputs.masked_logits,
            masked_log_probs=inputs.masked_log_probs,
            ref_log_probs=inputs.ref_log_probs,
            sft_weights=inputs.sft_weights,
            temperature=ctx.temperature,
            progress=ctx.progress,
            global_counts=ctx.counts,
            rollout_is_weights=inputs.rollout_is_weights,
            packing=inputs.packing,
        )
