"""The terms objectives are built from, each a small function over per-token tensors [b, s].

One micro-batch on the last pipeline stage: ``token_stats`` turns vocab-parallel logits into per-token
log-probs and entropies (nothing gathers the vocabulary); ``policy_gradient`` is the clipped surrogate;
``perception_kl`` / ``perception_term`` the PAPO perception KL; ``entropy_values`` the (double) entropy;
``reference_kl_term`` and ``sft_term`` the reference-KL and NLL terms. ``Aggregation`` reduces per-token
values to the scalars the objectives add up (``aggregate`` with the mini-batch's ``TokenCounts`` for a
global token-mean). Padding (``loss_mask`` 0) never reaches a loss: its values are ignored, whatever they
hold. Counts and sums are float32 (float64 for float64 logits) whatever the logits' dtype.
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
from megatron_papo.papo.config import AlgorithmConfig, LossAggMode
from megatron_papo.training.packing import Packing, flat_tokens, token_rows

# ------------------------------------------------------------------------------------------ aggregation


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


@dataclass(frozen=True)
class Aggregation:
    """How one micro-batch's per-token terms become scalars: ``mode`` over ``mask`` [b, s], with the
    mini-batch's ``counts`` as denominators when given (global token-mean); entropy terms are
    token-means whatever ``mode`` when ``entropy_token_mean`` (the PAPO reference)."""

    mode: LossAggMode
    mask: torch.Tensor
    counts: TokenCounts | None
    entropy_token_mean: bool

    @classmethod
    def of(cls, cfg: AlgorithmConfig, mask: torch.Tensor, counts: TokenCounts | None) -> Aggregation:
        return cls(cfg.loss_agg_mode, mask, counts, cfg.entropy_agg == "token-mean")

    def count(self, name: str) -> float | None:
        return getattr(self.counts, name) if self.counts is not None else None

    def __call__(
        self, values: torch.Tensor, mask: torch.Tensor | None = None, count: str = "response"
    ) -> torch.Tensor:
        """``values`` [b, s] over ``mask`` (default: the response tokens), denominator ``counts.<count>``."""
        return aggregate(values, self.mask if mask is None else mask, self.mode, self.count(count))

    def entropy(self, values: torch.Tensor) -> torch.Tensor:
        if self.entropy_token_mean:
            return aggregate(values, self.mask, "token-mean", self.count("response"))
        return self(values)


def local_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A metric: the mean of ``values`` [b, s] over this micro-batch's tokens of ``mask`` [b, s]."""
    return (torch.where(mask > 0, values, 0.0).sum() / mask.sum().clamp(min=1)).detach()


# ------------------------------------------------------------------------------------- per-token inputs


def response_values(name: str, values: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``values`` [b, s] with padding (``mask`` [b, s] == 0) replaced by ``fill`` [b, s], whatever it held
    (``fill`` = the current log-probs makes every padding term neutral); NaN / inf on response tokens are
    refused. No gradient."""
    bad = ~torch.isfinite(values) & (mask > 0)
    if bad.any():
        raise NonFiniteError(
            f"{name} is not finite on response tokens, at indices {bad.nonzero()[:4].tolist()}"
        )
    return torch.where(mask > 0, values.to(fill.dtype), fill).detach()


@dataclass(frozen=True)
class TokenStats:
    """One micro-batch's per-token quantities [b, s]: ``mask`` (response tokens, float32 / float64),
    ``lp`` / ``entropy`` (current policy, original image, with gradient), ``old_log_probs`` (no gradient),
    and with the masked image ``lp_mask`` (``masked_entropy``, ``exact_kl`` = KL(pi || pi_mask) only from
    masked logits)."""

    mask: torch.Tensor
    lp: torch.Tensor
    entropy: torch.Tensor
    old_log_probs: torch.Tensor
    lp_mask: torch.Tensor | None = None
    masked_entropy: torch.Tensor | None = None
    exact_kl: torch.Tensor | None = None

    def metrics(self) -> dict[str, torch.Tensor]:
        """papo/entropy (exact) and papo/entropy_sample (-lp): means over the response tokens."""
        return {
            "papo/entropy": local_mean(self.entropy, self.mask),
            "papo/entropy_sample": local_mean(-self.lp, self.mask),
        }


def token_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    temperature: float,
    masked_logits: torch.Tensor | None = None,
    masked_log_probs: torch.Tensor | None = None,
    masked_grad: bool = False,
    packing: Packing | None = None,
) -> TokenStats:
    """Check one micro-batch's inputs and compute its ``TokenStats``, vocab-parallel.

    logits: [b, s, vocab/tp] (with gradient), or packed [t, vocab/tp] (the micro-batch's real tokens,
    ``packing``: the stats are scattered back to [b, s], 0 on padding); labels, loss_mask, old_log_probs:
    [b, s] (labels[t] is the token logits[t] scores; ``old_log_probs`` None: on-policy, the current
    log-probs without gradient); advantages: [b]. The masked image as ``masked_logits`` (logits' shape;
    with gradient when ``masked_grad``, else detached) or as precomputed ``masked_log_probs`` [b, s].
    """
    b, s = labels.shape if packing is not None else logits.shape[:2]  # padded: the logits set [b, s]
    old_shape = None if old_log_probs is None else tuple(old_log_probs.shape)
    if labels.shape != (b, s) or loss_mask.shape != (b, s) or old_shape not in (None, (b, s)):
        raise ValueError(
            f"labels, loss_mask and old_log_probs must be [{b}, {s}], got {tuple(labels.shape)}, "
            f"{tuple(loss_mask.shape)}, {old_shape}"
        )
    expected = (b, s) if packing is None else (packing.tokens,)
    if logits.shape[:-1] != expected:
        raise ValueError(f"logits {tuple(logits.shape)} must be [{', '.join(map(str, expected))}, vocab/tp]")
    if advantages.shape != (b,):
        raise ValueError(f"advantages must be [{b}], got {tuple(advantages.shape)}")
    if not torch.isfinite(advantages).all():
        raise ValueError(f"advantages must be finite, got {advantages.tolist()}")
    # counts and sums in float32 (float64 for float64 logits), never in bfloat16
    mask = loss_mask.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    targets = torch.where(mask > 0, labels, 0)  # padding may hold an ignore index such as -100
    rows, targets = flat_tokens(logits, targets, packing)
    masked_entropy = exact_kl = None
    if masked_logits is not None:
        if masked_logits.shape != logits.shape:
            raise ValueError(
                f"masked_logits {tuple(masked_logits.shape)} must match logits {tuple(logits.shape)}"
            )
        q = masked_logits if masked_grad else masked_logits.detach()
        q_rows, _ = flat_tokens(q, labels, packing)
        stats = log_probs_entropies_and_kl(rows, q_rows, targets, temperature)
        lp, entropy, lp_mask, masked_entropy, exact_kl = (token_rows(x, (b, s), packing) for x in stats)
    else:
        lp, entropy = (
            token_rows(x, (b, s), packing) for x in log_probs_and_entropy(rows, targets, temperature)
        )
        lp_mask = None
        if masked_log_probs is not None:
            if masked_log_probs.shape != (b, s):
                raise ValueError(f"masked_log_probs must be [{b}, {s}], got {tuple(masked_log_probs.shape)}")
            lp_mask = response_values("masked_log_probs", masked_log_probs, mask, lp)
    old = lp.detach() if old_log_probs is None else response_values("old_log_probs", old_log_probs, mask, lp)
    return TokenStats(mask, lp, entropy, old, lp_mask, masked_entropy, exact_kl)


# ------------------------------------------------------------------------------------------------ terms


def policy_gradient(
    cfg: AlgorithmConfig,
    x: TokenStats,
    advantages: torch.Tensor,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate per token [b, s] (GRPO / DAPO, dual clip for negative advantages) and its
    metrics. advantages: [b] (no gradient); rollout_is_weights: [b, s] truncated importance weights
    pi_old / pi_rollout that multiply each token's term (``megatron_papo.rollout.correction``).

        r_t  = exp(clamp(lp - lp_old, -c, c))
        pg_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high))     (A < 0: min(pg_t, -A clip_dual))

    Metrics (means over the response tokens): actor/pg_loss, actor/pg_clipfrac (and _high: ratio above
    1 + eps_high with A > 0, _low), actor/approx_kl, actor/ratio_dev_max (max |ratio - 1|),
    actor/tis_weight (with ``rollout_is_weights``).
    """
    mask, lp = x.mask, x.lp
    log_ratio = (lp - x.old_log_probs).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    a = advantages.to(lp.dtype).unsqueeze(-1)
    unclipped = -a * ratio
    clipped = -a * ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    pg = torch.maximum(unclipped, clipped)
    pg = torch.where(a < 0, torch.minimum(pg, -a * cfg.clip_dual), pg)
    metrics = {}
    if rollout_is_weights is not None:
        b, s = mask.shape
        if rollout_is_weights.shape != (b, s):
            raise ValueError(f"rollout_is_weights must be [{b}, {s}], got {tuple(rollout_is_weights.shape)}")
        weights = response_values("rollout_is_weights", rollout_is_weights, mask, torch.ones_like(lp))
        pg = pg * weights
        metrics["actor/tis_weight"] = local_mean(weights, mask)
    return pg, metrics | {
        "actor/pg_loss": local_mean(pg, mask),
        "actor/pg_clipfrac": local_mean((clipped > unclipped).to(mask.dtype), mask),
        "actor/pg_clipfrac_high": local_mean(((ratio > 1 + cfg.eps_high) & (a > 0)).to(mask.dtype), mask),
        "actor/pg_clipfrac_low": local_mean(((ratio < 1 - cfg.eps_low) & (a < 0)).to(mask.dtype), mask),
        "actor/approx_kl": local_mean(-log_ratio, mask),
        "actor/ratio_dev_max": torch.where(mask > 0, (ratio - 1).abs(), 0.0).max().detach(),
    }


def top_p_by_count(kl: torch.Tensor, mask: torch.Tensor, top_p: float) -> torch.Tensor:
    """Per sample, 1 on exactly the ceil(top_p * tokens) response tokens with the largest ``kl`` [b, s]
    (ties broken by position)."""
    ranked = torch.where(mask > 0, kl.detach(), -torch.inf).argsort(dim=-1, descending=True, stable=True)
    position = ranked.argsort(dim=-1)  # each token's place in its sample's ranking
    keep = position < torch.ceil(mask.sum(-1, keepdim=True) * top_p)
    return keep.to(mask.dtype) * mask


def top_p_by_quantile(kl: torch.Tensor, mask: torch.Tensor, top_p: float) -> torch.Tensor:
    """The PAPO reference's selection [b, s]: per sample, 1 on response tokens whose KL_prc is >= the
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


def perception_term(
    cfg: AlgorithmConfig, kl: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token KL_prc as it enters the loss [b, s], the mask it is averaged over [b, s]): top-p
    selection and per-token clip in the configured order (``papo.config``)."""
    clip = cfg.kl_prc_token_clip
    if cfg.kl_prc_top_p is None:
        return (kl.clamp(0.0, clip) if clip is not None else kl), mask
    if cfg.kl_prc_top_p_select == "quantile":  # reference: select on the raw values, zero the rest, clip
        kl = kl * top_p_by_quantile(kl, mask, cfg.kl_prc_top_p)
        return (kl.clamp(0.0, clip) if clip is not None else kl), mask
    kl = kl.clamp(0.0, clip) if clip is not None else kl
    return kl, top_p_by_count(kl, mask, cfg.kl_prc_top_p)


def entropy_values(cfg: AlgorithmConfig, x: TokenStats, masked: bool = False) -> torch.Tensor:
    """Per-token entropy [b, s] of the policy (``masked``: with the masked image) with
    ``cfg.entropy_estimator``: ``sample`` -lp (the reference) or ``exact`` (the vocabulary entropy)."""
    if cfg.entropy_estimator == "sample":
        return -(x.lp_mask if masked else x.lp)
    if masked and x.masked_entropy is None:
        raise ValueError("entropy_estimator 'exact' needs the masked-image logits (masked_logits)")
    return x.masked_entropy if masked else x.entropy


def reference_kl(cfg: AlgorithmConfig, log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token KL to the reference model [b, s] with ``cfg.ref_kl_estimator`` (k3 clamped to +-10, as
    the reference's ``low_var_kl``; k1 / k2 unclamped). log_probs, ref_log_probs: [b, s]."""
    k3 = cfg.ref_kl_estimator == "k3"
    return kl_estimate(log_probs, ref_log_probs, cfg.ref_kl_estimator, clamp=10.0 if k3 else None)


def reference_kl_term(
    cfg: AlgorithmConfig, x: TokenStats, ref_log_probs: torch.Tensor | None, agg: Aggregation
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The aggregated KL to the reference model (uncoefficiented) and actor/ref_kl; ref_log_probs [b, s]."""
    b, s = x.mask.shape
    if ref_log_probs is None or ref_log_probs.shape != (b, s):
        raise ValueError(f"ref_kl_coef={cfg.ref_kl_coef} needs ref_log_probs [{b}, {s}]")
    ref_kl = reference_kl(cfg, x.lp, response_values("ref_log_probs", ref_log_probs, x.mask, x.lp))
    return agg(ref_kl), {"actor/ref_kl": local_mean(ref_kl, x.mask)}


def sft_term(
    x: TokenStats, sft_weights: torch.Tensor | None, agg: Aggregation
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The NLL over the response tokens of correct rollouts (a token-mean over them, whatever the mode)
    and actor/sft_loss; sft_weights: [b] (1 = correct rollout)."""
    b = x.mask.shape[0]
    if sft_weights is None or sft_weights.shape != (b,):
        raise ValueError(f"use_sft_loss needs sft_weights [{b}] (1 = correct rollout)")
    sft_mask = x.mask * sft_weights.to(x.mask.dtype).unsqueeze(-1)
    term = aggregate(-x.lp, sft_mask, "token-mean", agg.count("sft"))
    return term, {"actor/sft_loss": local_mean(-x.lp, sft_mask)}
