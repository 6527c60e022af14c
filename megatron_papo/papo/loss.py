"""The PAPO objective (``../shared/papo-spec.md``): what a researcher reads to know what is optimised.

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

Global token-mean (``global_token_mean``): the reference averages each micro-batch on its own, so tokens
of short micro-batches weigh more. Here the caller passes ``global_token_count``, the response tokens of
the whole mini-batch on all DP ranks; each micro-batch's loss is its token SUM over that count, and the
caller multiplies it by ``num_microbatches * dp_size`` to undo megatron-core's averaging (schedule and
DDP), so the summed gradients are those of one token-mean (``tests/test_gpt_microstep.py`` checks it).
With ``kl_prc_top_p`` the KL_prc sum over the kept tokens is then divided by all tokens, not the kept.
"""

from __future__ import annotations

import torch

from megatron_papo.ops.vocab_parallel import (
    NonFiniteError,
    kl_estimate,
    log_probs_and_entropy,
    log_probs_entropies_and_kl,
)
from megatron_papo.papo.config import AlgorithmConfig


def aggregate(
    values: torch.Tensor, mask: torch.Tensor, mode: str, global_token_count: float | None = None
) -> torch.Tensor:
    """Reduce per-token ``values`` [b, s] over response tokens ``mask`` [b, s] to a scalar.

    token-mean: sum / tokens (``global_token_count``: the tokens of the whole mini-batch on all DP ranks,
    so that summed micro-batch losses make one exact token-mean); seq-mean-token-mean: mean over sequences
    of each one's token-mean; seq-mean-token-sum: mean over sequences of each one's token sum.
    """
    masked = torch.where(mask > 0, values, 0.0)
    if mode == "token-mean":
        denominator = global_token_count if global_token_count is not None else mask.sum().clamp(min=1)
        return masked.sum() / denominator
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if mode == "seq-mean-token-sum":
        return masked.sum(-1).mean()
    raise ValueError(f"unknown loss_agg_mode {mode!r}")


def _local_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (torch.where(mask > 0, values, 0.0).sum() / mask.sum().clamp(min=1)).detach()


def _response_values(name: str, values: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``values`` [b, s] with padding (``mask`` [b, s] == 0) replaced by ``fill`` [b, s], whatever it held
    (``fill`` = the current log-probs makes every padding term neutral); NaN / inf on response tokens are
    refused. No gradient."""
    bad = ~torch.isfinite(values) & (mask > 0)
    if bad.any():
        raise NonFiniteError(
            f"{name} is not finite on response tokens, at indices {bad.nonzero()[:4].tolist()}"
        )
    return torch.where(mask > 0, values, fill).detach()


def _top_p_mask(kl: torch.Tensor, mask: torch.Tensor, top_p: float) -> torch.Tensor:
    """Per sample, 1 on the ceil(top_p * tokens) response tokens with the largest KL_prc [b, s]."""
    ranked = torch.where(mask > 0, kl.detach(), -torch.inf).argsort(dim=-1, descending=True, stable=True)
    position = ranked.argsort(dim=-1)  # each token's place in its sample's ranking
    keep = position < torch.ceil(mask.sum(-1, keepdim=True) * top_p)
    return keep.to(mask.dtype) * mask


def perception_kl(
    cfg: AlgorithmConfig, lp: torch.Tensor, lp_mask: torch.Tensor, exact_kl: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token KL_prc [b, s] with the configured estimator, clamped as the reference does.

    lp, lp_mask: [b, s] log-probs of the sampled tokens with the original and the masked image;
    exact_kl: [b, s] the full-vocabulary KL(pi || pi_mask) (needed by the ``exact`` estimator).
    """
    if cfg.kl_prc_estimator == "exact":
        if exact_kl is None:
            raise ValueError("kl_prc_estimator 'exact' needs the masked-image logits (masked_logits)")
        kl = exact_kl.clamp(-cfg.kl_prc_clamp, cfg.kl_prc_clamp)
    elif cfg.kl_prc_estimator == "k3_inverted":  # the paper's figure: ratio pi / pi_mask
        kl = kl_estimate(lp_mask, lp, "k3", clamp=cfg.kl_prc_clamp)
    else:  # reference: x = lp_mask - lp, KL(pi || pi_mask) estimated on tokens sampled from pi
        kl = kl_estimate(lp, lp_mask, cfg.kl_prc_estimator, clamp=cfg.kl_prc_clamp)
    if cfg.kl_prc_token_clip is not None:
        kl = kl.clamp(0.0, cfg.kl_prc_token_clip)
    return kl


def papo_loss(
    cfg: AlgorithmConfig,
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    old_log_probs: torch.Tensor,
    *,
    masked_logits: torch.Tensor | None = None,
    masked_log_probs: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    temperature: float = 1.0,
    progress: float = 0.0,
    global_token_count: float | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch and its metrics.

    logits: [b, s, vocab/tp] (with gradient); labels, loss_mask, old_log_probs: [b, s] (labels[t] is the
    token logits[t] scores; loss_mask 1 on response tokens; padding values are ignored); advantages: [b].
    The masked image comes as ``masked_logits`` [b, s, vocab/tp] (with gradient when ``cfg.masked_grad``,
    else detached; needed by the exact KL / entropy) or as precomputed ``masked_log_probs`` [b, s] (no
    gradient: the reference default). ``ref_log_probs`` [b, s] when the ref-KL term is on. ``progress``
    in [0, 1] drives gamma annealing. ``global_token_count``: see ``aggregate`` (the caller then scales
    the loss for the schedule's averaging). ``rollout_is_weights`` [b, s] (no gradient): per-token
    truncated importance weights pi_old / pi_rollout that multiply the policy-gradient term
    (``megatron_papo.rollout.correction``).

    Metrics (detached, means over this micro-batch's response tokens): actor/pg_loss, actor/pg_clipfrac
    (and _high: ratio above 1 + eps_high with A > 0, _low), actor/approx_kl, papo/entropy (exact),
    papo/kl_prc, papo/masked_entropy (exact with masked logits, else -lp_mask), papo/gamma, actor/ref_kl,
    actor/tis_weight (with ``rollout_is_weights``), actor/loss.
    """
    b, s, v = logits.shape
    if labels.shape != (b, s) or loss_mask.shape != (b, s) or old_log_probs.shape != (b, s):
        raise ValueError(
            f"labels, loss_mask and old_log_probs must be [{b}, {s}], got {tuple(labels.shape)}, "
            f"{tuple(loss_mask.shape)}, {tuple(old_log_probs.shape)}"
        )
    if advantages.shape != (b,):
        raise ValueError(f"advantages must be [{b}], got {tuple(advantages.shape)}")
    if not torch.isfinite(advantages).all():
        raise ValueError(f"advantages must be finite, got {advantages.tolist()}")
    mask = loss_mask.to(logits.dtype)
    targets = torch.where(mask > 0, labels, 0).flatten()  # padding may hold an ignore index such as -100

    def agg(values: torch.Tensor, m: torch.Tensor = mask) -> torch.Tensor:
        return aggregate(values, m, cfg.loss_agg_mode, global_token_count)

    # per-token log-probs and entropies, vocab-parallel: one pass over both logit tensors when both are here
    masked_entropy = exact_kl = None
    if masked_logits is not None:
        if masked_logits.shape != logits.shape:
            raise ValueError(f"masked_logits {tuple(masked_logits.shape)} must match logits {(b, s, v)}")
        q = masked_logits if cfg.masked_grad else masked_logits.detach()
        stats = log_probs_entropies_and_kl(
            logits.reshape(b * s, v), q.reshape(b * s, v), targets, temperature
        )
        lp, entropy, lp_mask, masked_entropy, exact_kl = (x.view(b, s) for x in stats)
    else:
        lp, entropy = (
            x.view(b, s) for x in log_probs_and_entropy(logits.reshape(b * s, v), targets, temperature)
        )
        lp_mask = None
        if masked_log_probs is not None:
            if masked_log_probs.shape != (b, s):
                raise ValueError(f"masked_log_probs must be [{b}, {s}], got {tuple(masked_log_probs.shape)}")
            lp_mask = _response_values("masked_log_probs", masked_log_probs, mask, lp)
    old_log_probs = _response_values("old_log_probs", old_log_probs, mask, lp)

    # clipped surrogate (GRPO / DAPO), dual clip for negative advantages
    log_ratio = (lp - old_log_probs).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    a = advantages.to(lp.dtype).unsqueeze(-1)
    unclipped = -a * ratio
    clipped = -a * ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    pg = torch.maximum(unclipped, clipped)
    pg = torch.where(a < 0, torch.minimum(pg, -a * cfg.clip_dual), pg)
    if rollout_is_weights is not None:
        if rollout_is_weights.shape != (b, s):
            raise ValueError(f"rollout_is_weights must be [{b}, {s}], got {tuple(rollout_is_weights.shape)}")
        weights = _response_values("rollout_is_weights", rollout_is_weights, mask, torch.ones_like(lp))
        pg = pg * weights
    loss = agg(pg)
    metrics = {
        "actor/pg_loss": _local_mean(pg, mask),
        "actor/pg_clipfrac": _local_mean((clipped > unclipped).to(mask.dtype), mask),
        "actor/pg_clipfrac_high": _local_mean(((ratio > 1 + cfg.eps_high) & (a > 0)).to(mask.dtype), mask),
        "actor/pg_clipfrac_low": _local_mean(((ratio < 1 - cfg.eps_low) & (a < 0)).to(mask.dtype), mask),
        "actor/approx_kl": _local_mean(-log_ratio, mask),
        "papo/entropy": _local_mean(entropy, mask),
    }
    if rollout_is_weights is not None:
        metrics["actor/tis_weight"] = _local_mean(weights, mask)

    # Double Entropy Loss (first term) and Implicit Perception Loss, annealed together
    factor = cfg.anneal_factor(progress)
    exact_entropy = cfg.entropy_estimator == "exact"
    if cfg.eta1:
        loss = loss + cfg.eta1 * factor * agg(entropy if exact_entropy else -lp)
    if cfg.uses_masked_images:
        if lp_mask is None:
            raise ValueError(
                f"algorithm {cfg.name} (gamma={cfg.gamma}, eta2={cfg.eta2}) needs the masked image: "
                "pass masked_logits or masked_log_probs"
            )
        kl = perception_kl(cfg, lp, lp_mask, exact_kl)
        kl_mask = _top_p_mask(kl, mask, cfg.kl_prc_top_p) if cfg.kl_prc_top_p is not None else mask
        if cfg.gamma:
            loss = loss - cfg.gamma * factor * agg(kl, kl_mask)
        if cfg.eta2:
            if exact_entropy and masked_entropy is None:
                raise ValueError("entropy_estimator 'exact' needs the masked-image logits (masked_logits)")
            loss = loss + cfg.eta2 * factor * agg(masked_entropy if exact_entropy else -lp_mask)
        metrics["papo/kl_prc"] = _local_mean(kl, kl_mask)
        metrics["papo/masked_entropy"] = _local_mean(
            masked_entropy if masked_entropy is not None else -lp_mask, mask
        )
        metrics["papo/gamma"] = torch.tensor(cfg.gamma * factor)

    # KL to the reference model (k3, clamped)
    if cfg.uses_ref_kl:
        if ref_log_probs is None or ref_log_probs.shape != (b, s):
            raise ValueError(f"ref_kl_coef={cfg.ref_kl_coef} needs ref_log_probs [{b}, {s}]")
        ref_log_probs = _response_values("ref_log_probs", ref_log_probs, mask, lp)
        ref_kl = kl_estimate(lp, ref_log_probs, "k3", clamp=10.0)
        loss = loss + cfg.ref_kl_coef * agg(ref_kl)
        metrics["actor/ref_kl"] = _local_mean(ref_kl, mask)

    metrics["actor/loss"] = loss.detach()
    return loss, metrics
