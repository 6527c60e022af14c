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

import math
from dataclasses import dataclass

import torch

from megatron_papo.ops.vocab_parallel import (
    NonFiniteError,
    kl_estimate,
    log_probs_and_entropy,
    log_probs_entropies_and_kl,
)
from megatron_papo.papo.config import AlgorithmConfig


@dataclass(frozen=True)
class TokenCounts:
    """Denominators of an exact token-mean over a whole mini-batch (all micro-batches, all DP ranks).

    response: response tokens; kl_prc: the tokens KL_prc averages over (the kept ones with
    ``kl_prc_top_p_select: count``, else all response tokens); sft: response tokens of correct rollouts.
    """

    response: float
    kl_prc: float
    sft: float

    @classmethod
    def from_sums(cls, sums: torch.Tensor) -> TokenCounts:
        """From the all-reduced ``local_token_counts`` [3]; a zero count becomes 1 (its sum is 0 too)."""
        response, kl_prc, sft = (max(float(x), 1.0) for x in sums)
        return cls(response, kl_prc, sft)


def local_token_counts(
    cfg: AlgorithmConfig, loss_mask: torch.Tensor, sft_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """This rank's share of ``TokenCounts`` as a float64 [3] tensor, to be all-reduced (SUM) over DP.

    loss_mask: [N, L] of the mini-batch's sequences on this rank; sft_weights: [N] (1 = correct rollout).
    """
    tokens = loss_mask.double().sum(-1)  # [N]
    kl_tokens = tokens
    if cfg.kl_prc_top_p is not None and cfg.kl_prc_top_p_select == "count":
        kl_tokens = torch.ceil(tokens * cfg.kl_prc_top_p)
    sft = tokens * sft_weights.double() if sft_weights is not None else torch.zeros_like(tokens)
    return torch.stack([tokens.sum(), kl_tokens.sum(), sft.sum()])


def aggregate(
    values: torch.Tensor, mask: torch.Tensor, mode: str, denominator: float | None = None
) -> torch.Tensor:
    """Reduce per-token ``values`` [b, s] over the tokens of ``mask`` [b, s] to a scalar.

    token-mean: sum / tokens (``denominator``: a count over the whole mini-batch, so that summed
    micro-batch losses make one exact token-mean); seq-mean-token-mean: mean over sequences of each one's
    token-mean; seq-mean-token-sum: mean over sequences of each one's token sum.
    """
    masked = torch.where(mask > 0, values, 0.0)
    if mode == "token-mean":
        return masked.sum() / (denominator if denominator is not None else mask.sum().clamp(min=1))
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
    return torch.where(mask > 0, values.to(fill.dtype), fill).detach()


def top_p_by_count(kl: torch.Tensor, mask: torch.Tensor, top_p: float) -> torch.Tensor:
    """Per sample, 1 on exactly the ceil(top_p * tokens) response tokens with the largest KL_prc [b, s]
    (ties broken by position)."""
    ranked = torch.where(mask > 0, kl.detach(), -torch.inf).argsort(dim=-1, descending=True, stable=True)
    position = ranked.argsort(dim=-1)  # each token's place in its sample's ranking
    keep = position < torch.ceil(mask.sum(-1, keepdim=True) * top_p)
    return keep.to(mask.dtype) * mask


def top_p_by_quantile(kl: torch.Tensor, mask: torch.Tensor, top_p: float) -> torch.Tensor:
    """The reference's selection [b, s]: per sample, 1 on response tokens whose KL_prc is >= the
    ``nanquantile`` (linear interpolation) of its response tokens' KL_prc at ``1 - top_p``; ties kept."""
    valid = mask > 0
    threshold = torch.nanquantile(kl.detach().masked_fill(~valid, math.nan), 1.0 - top_p, dim=1, keepdim=True)
    return ((kl.detach() >= threshold) & valid).to(mask.dtype)


def perception_kl(
    cfg: AlgorithmConfig, lp: torch.Tensor, lp_mask: torch.Tensor, exact_kl: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token KL_prc [b, s] with the configured estimator, clamped as the reference does (k3-type and
    exact estimates to +-``kl_prc_clamp``; k1 / k2 only with ``kl_prc_clamp_all``). No per-token clip.

    lp, lp_mask: [b, s] log-probs of the sampled tokens with the original and the masked image;
    exact_kl: [b, s] the full-vocabulary KL(pi || pi_mask) (needed by the ``exact`` estimator).
    """
    clamp = cfg.kl_prc_clamp
    if cfg.kl_prc_estimator == "exact":
        if exact_kl is None:
            raise ValueError("kl_prc_estimator 'exact' needs the masked-image logits (masked_logits)")
        return exact_kl.clamp(-clamp, clamp)
    if cfg.kl_prc_estimator == "k3_inverted":  # the paper's figure: ratio pi / pi_mask
        return kl_estimate(lp_mask, lp, "k3", clamp=clamp)
    # reference: x = lp_mask - lp, KL(pi || pi_mask) estimated on tokens sampled from pi
    clamped = cfg.kl_prc_estimator == "k3" or cfg.kl_prc_clamp_all
    return kl_estimate(lp, lp_mask, cfg.kl_prc_estimator, clamp=clamp if clamped else None)


def _perception_term(
    cfg: AlgorithmConfig, kl: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token KL_prc as it enters the loss [b, s], the mask it is averaged over [b, s]): top-p
    selection and per-token clip in the configured order (see the module doc)."""
    clip = cfg.kl_prc_token_clip
    if cfg.kl_prc_top_p is None:
        return (kl.clamp(0.0, clip) if clip is not None else kl), mask
    if cfg.kl_prc_top_p_select == "quantile":  # reference: select on the raw values, zero the rest, clip
        kl = kl * top_p_by_quantile(kl, mask, cfg.kl_prc_top_p)
        return (kl.clamp(0.0, clip) if clip is not None else kl), mask
    kl = kl.clamp(0.0, clip) if clip is not None else kl
    return kl, top_p_by_count(kl, mask, cfg.kl_prc_top_p)


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
    sft_weights: torch.Tensor | None = None,
    temperature: float = 1.0,
    progress: float = 0.0,
    global_counts: TokenCounts | None = None,
    rollout_is_weights: torch.Tensor | None = None,
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

    Metrics (detached, means over this micro-batch's response tokens): actor/pg_loss, actor/pg_clipfrac
    (and _high: ratio above 1 + eps_high with A > 0, _low), actor/approx_kl, actor/ratio_dev_max (max
    |ratio - 1|), papo/entropy and papo/entropy_sample (exact and -lp), papo/masked_entropy (exact, with
    masked logits) and papo/masked_entropy_sample (-lp_mask), papo/kl_prc (as it enters the loss),
    papo/gamma, actor/ref_kl, actor/sft_loss, actor/tis_weight (with ``rollout_is_weights``), actor/loss.
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
    # counts and sums in float32 (float64 for float64 logits), never in bfloat16
    mask = loss_mask.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    targets = torch.where(mask > 0, labels, 0).flatten()  # padding may hold an ignore index such as -100
    counts = global_counts

    def agg(values: torch.Tensor, m: torch.Tensor = mask, count: float | None = None) -> torch.Tensor:
        return aggregate(values, m, cfg.loss_agg_mode, count if count is not None else _count("response"))

    def _count(name: str) -> float | None:
        return getattr(counts, name) if counts is not None else None

    def agg_entropy(values: torch.Tensor) -> torch.Tensor:
        if cfg.entropy_agg == "token-mean":  # reference: a token-mean whatever loss_agg_mode
            return aggregate(values, mask, "token-mean", _count("response"))
        return agg(values)

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
        "actor/ratio_dev_max": torch.where(mask > 0, (ratio - 1).abs(), 0.0).max().detach(),
        "papo/entropy": _local_mean(entropy, mask),
        "papo/entropy_sample": _local_mean(-lp, mask),
    }
    if rollout_is_weights is not None:
        metrics["actor/tis_weight"] = _local_mean(weights, mask)

    # Double Entropy Loss (first term) and Implicit Perception Loss, annealed together
    factor = cfg.anneal_factor(progress)
    exact_entropy = cfg.entropy_estimator == "exact"
    if cfg.eta1:
        loss = loss + cfg.eta1 * factor * agg_entropy(entropy if exact_entropy else -lp)
    if cfg.uses_masked_images:
        if lp_mask is None:
            raise ValueError(
                f"algorithm {cfg.name} (gamma={cfg.gamma}, eta2={cfg.eta2}) needs the masked image: "
                "pass masked_logits or masked_log_probs"
            )
        kl, kl_mask = _perception_term(cfg, perception_kl(cfg, lp, lp_mask, exact_kl), mask)
        by_count = cfg.kl_prc_top_p is not None and cfg.kl_prc_top_p_select == "count"
        if cfg.gamma:
            loss = loss - cfg.gamma * factor * agg(kl, kl_mask, _count("kl_prc" if by_count else "response"))
        if cfg.eta2:
            if exact_entropy and masked_entropy is None:
                raise ValueError("entropy_estimator 'exact' needs the masked-image logits (masked_logits)")
            loss = loss + cfg.eta2 * factor * agg_entropy(masked_entropy if exact_entropy else -lp_mask)
        metrics["papo/kl_prc"] = _local_mean(kl, kl_mask)
        metrics["papo/masked_entropy_sample"] = _local_mean(-lp_mask, mask)
        if masked_entropy is not None:
            metrics["papo/masked_entropy"] = _local_mean(masked_entropy, mask)
        metrics["papo/gamma"] = torch.tensor(cfg.gamma * factor)

    # KL to the reference model (clamped as the reference's compute_kl: k3 only)
    if cfg.ref_kl_in_loss:
        if ref_log_probs is None or ref_log_probs.shape != (b, s):
            raise ValueError(f"ref_kl_coef={cfg.ref_kl_coef} needs ref_log_probs [{b}, {s}]")
        ref_log_probs = _response_values("ref_log_probs", ref_log_probs, mask, lp)
        ref_kl = reference_kl(cfg, lp, ref_log_probs)
        loss = loss + cfg.ref_kl_coef * agg(ref_kl)
        metrics["actor/ref_kl"] = _local_mean(ref_kl, mask)

    # reference extra: NLL on the response tokens of correct rollouts (a token-mean over them)
    if cfg.use_sft_loss:
        if sft_weights is None or sft_weights.shape != (b,):
            raise ValueError(f"use_sft_loss needs sft_weights [{b}] (1 = correct rollout)")
        sft_mask = mask * sft_weights.to(mask.dtype).unsqueeze(-1)
        loss = loss + cfg.sft_loss_coef * aggregate(-lp, sft_mask, "token-mean", _count("sft"))
        metrics["actor/sft_loss"] = _local_mean(-lp, sft_mask)

    metrics["actor/loss"] = loss.detach()
    return loss, metrics


def reference_kl(cfg: AlgorithmConfig, log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token KL to the reference model [b, s] with ``cfg.ref_kl_estimator`` (k3 clamped to +-10, as
    the reference's ``low_var_kl``; k1 / k2 unclamped). log_probs, ref_log_probs: [b, s]."""
    k3 = cfg.ref_kl_estimator == "k3"
    return kl_estimate(log_probs, ref_log_probs, cfg.ref_kl_estimator, clamp=10.0 if k3 else None)
