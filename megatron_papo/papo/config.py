"""The ``algorithm`` section: GRPO, DAPO, PAPO-G, PAPO-D and every coefficient of the PAPO spec.

``objective`` names the registered loss (``megatron_papo.objectives``; ``papo`` by default, whose terms
the presets set); ``vppo_*`` are VPPO's coefficients (``docs/objectives.md``). Loading the config builds
the objective, so an unknown name or coefficients it refuses fail here.

``name`` picks a preset; any field left at ``None`` takes the preset's value, any field set explicitly
wins. Presets (``../shared/papo-spec.md``):

| name   | eps_low/high | gamma | eta1 = eta2 | ref-KL | dynamic sampling |
|--------|--------------|-------|-------------|--------|------------------|
| grpo   | 0.2 / 0.3    | 0     | 0           | 0.01   | no               |
| papo_g | 0.2 / 0.3    | 0.02  | 0.05        | 0.01   | no               |
| dapo   | 0.2 / 0.28   | 0     | 0           | 0      | yes              |
| papo_d | 0.2 / 0.28   | 0.01  | 0.03        | 0      | yes              |

Reference behaviour is the default; the corrected variants the brief asks for are options:
``masked_grad`` (masked-image log-probs with gradient, so the masked-entropy term acts),
``kl_prc_estimator: k3_inverted`` (the paper's figure: ratio pi/pi_mask instead of pi_mask/pi) or
``exact`` (full-vocabulary KL), and ``global_token_mean`` (one token-mean over the whole mini-batch, all
micro-batches and DP ranks, instead of a mean per micro-batch). Where the official PAPO code's own loss
functions differ from a cleaner formulation, the reference is the default and the other a named option:
``kl_prc_top_p_select`` (``quantile``: the reference's nanquantile threshold, ties kept, mask before the
per-token clip, kept KL summed over ALL response tokens; ``count``: exactly ceil(top_p * tokens) tokens,
averaged over the kept ones), ``entropy_agg`` (``token-mean``: both entropy terms token-averaged whatever
``loss_agg_mode``, as the reference; ``loss_agg_mode``: aggregated like the other terms) and
``kl_prc_clamp_all`` (the reference clamps only k3-type estimators; True clamps k1 / k2 too).
Reference extras, default off: ``use_sft_loss`` (an NLL term on correct rollouts) and ``ref_kl_in_reward``
(the reference-KL as a reward penalty, fixed or adaptive controller, instead of a loss term).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from megatron_papo.config_io import check_choices

AlgorithmName = Literal["grpo", "dapo", "papo_g", "papo_d"]
KLPrcEstimator = Literal["k1", "k2", "k3", "k3_inverted", "exact"]
LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
KLEstimator = Literal["k1", "k2", "k3"]

PRESETS: dict[str, dict[str, object]] = {
    "grpo": dict(
        eps_low=0.2, eps_high=0.3, gamma=0.0, eta1=0.0, eta2=0.0, ref_kl_coef=0.01, dynamic_sampling=False
    ),
    "papo_g": dict(
        eps_low=0.2, eps_high=0.3, gamma=0.02, eta1=0.05, eta2=0.05, ref_kl_coef=0.01, dynamic_sampling=False
    ),
    "dapo": dict(
        eps_low=0.2, eps_high=0.28, gamma=0.0, eta1=0.0, eta2=0.0, ref_kl_coef=0.0, dynamic_sampling=True
    ),
    "papo_d": dict(
        eps_low=0.2, eps_high=0.28, gamma=0.01, eta1=0.03, eta2=0.03, ref_kl_coef=0.0, dynamic_sampling=True
    ),
}


@dataclass
class AlgorithmConfig:
    name: AlgorithmName = "papo_g"
    # the registered objective (``megatron_papo.objectives``): papo (GRPO / DAPO / PAPO by coefficients),
    # vppo, papo_vppo; see docs/objectives.md
    objective: str = "papo"
    # clipped surrogate
    eps_low: float | None = None
    eps_high: float | None = None
    clip_dual: float = 3.0  # dual-clip constant for negative advantages
    log_ratio_clamp: float = 20.0
    # Implicit Perception Loss: loss -= gamma * agg(KL_prc)
    gamma: float | None = None
    kl_prc_estimator: KLPrcEstimator = "k3"
    kl_prc_clamp: float = 10.0  # per-token clamp to [-c, c] of k3 / k3_inverted / exact (reference)
    kl_prc_clamp_all: bool = False  # True: clamp k1 and k2 too (the reference leaves them unclamped)
    kl_prc_token_clip: float | None = None  # option: per-token clip to [0, c] (c = 0.2)
    kl_prc_top_p: float | None = None  # option: keep the top-p fraction (0.2) of tokens per sample by KL_prc
    kl_prc_top_p_select: Literal["quantile", "count"] = "quantile"  # quantile: reference (see module doc)
    gamma_anneal: Literal["none", "linear"] = "none"
    gamma_start: float = 1.0  # annealing factor at the start (times gamma and the entropy coefficients)
    gamma_end: float = 0.0
    gamma_anneal_fraction: float = 1.0  # fraction of training over which the factor moves start -> end
    # Double Entropy Loss: loss += eta1 * H[pi] + eta2 * H[pi_mask]
    eta1: float | None = None
    eta2: float | None = None
    entropy_estimator: Literal["sample", "exact"] = "sample"  # sample: H = -mean(lp) as the reference code
    entropy_agg: Literal["token-mean", "loss_agg_mode"] = "token-mean"  # token-mean: reference, any mode
    masked_grad: bool = False
    # KL to the reference model: loss += ref_kl_coef * agg(k(lp_ref - lp)), or (ref_kl_in_reward) each
    # response's score -= coef * sum_t k(lp_ref - lp_old) before advantages, coef from a KL controller
    ref_kl_coef: float | None = None
    ref_kl_estimator: KLEstimator = "k3"  # k3 = the reference scripts' low_var_kl (clamped to +-10)
    ref_kl_in_reward: bool = False
    ref_kl_controller: Literal["fixed", "adaptive"] = "fixed"
    ref_kl_target: float = 0.1  # adaptive controller: target KL per token
    ref_kl_horizon: float = 10000.0  # adaptive controller: horizon in responses
    # reference extra: loss += sft_loss_coef * NLL over the response tokens of correct rollouts
    use_sft_loss: bool = False
    sft_loss_coef: float = 1e-3
    sft_min_accuracy: float = 0.1  # a rollout is "correct" when its accuracy is above this (reference)
    # VPPO (objectives vppo, papo_vppo; docs/objectives.md): the official recipe's values
    vppo_top_k: float = 0.4  # TGF: fraction of each response's tokens (by dependency) with gradient; 1: off
    vppo_beta_min: float = 0.9  # TAS: the trajectory factor's lower bound; 1: no shaping
    vppo_beta_max: float | None = None  # None: dynamic, beta_min + (1 - beta_min) / mean(normalised S)
    vppo_tas_scope: Literal["batch", "rank_micro_batch"] = "batch"  # rank_micro_batch: the official code
    vppo_dependency_clamp: float = 10.0  # S_t clamped to [0, c] (the official code)
    vppo_entropy_coef: float = 0.06  # vppo only: loss += coef * H[pi] (sample estimator: -lp)
    # aggregation
    loss_agg_mode: LossAggMode = "token-mean"
    global_token_mean: bool = False
    # advantages and sampling
    scale_advantages_by_std: bool = True
    dynamic_sampling: bool | None = None
    dynamic_sampling_low: float = 0.01
    dynamic_sampling_high: float = 0.99
    max_tries: int = 3
    overlong_buffer: int = 0  # DAPO's soft overlong punishment over the last N tokens; 0: off (reference)
    overlong_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_choices(self, "algorithm")
        for key, value in PRESETS[self.name].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for f in fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if number and f.name not in ("gamma_start", "gamma_end") and value < 0:
                raise ValueError(f"algorithm.{f.name} must be >= 0, got {value}")
        if not (0 < self.eps_low < 1 and self.eps_high > 0):
            raise ValueError(
                f"algorithm: need 0 < eps_low < 1 and eps_high > 0, got {self.eps_low}, {self.eps_high}"
            )
        if self.clip_dual <= 1:
            raise ValueError(f"algorithm.clip_dual must be > 1, got {self.clip_dual}")
        if self.kl_prc_top_p is not None and not 0 < self.kl_prc_top_p <= 1:
            raise ValueError(f"algorithm.kl_prc_top_p must be in (0, 1], got {self.kl_prc_top_p}")
        if not 0 < self.gamma_anneal_fraction <= 1:
            raise ValueError(
                f"algorithm.gamma_anneal_fraction must be in (0, 1], got {self.gamma_anneal_fraction}"
            )
        if not 0 <= self.dynamic_sampling_low < self.dynamic_sampling_high <= 1:
            raise ValueError("algorithm: need 0 <= dynamic_sampling_low < dynamic_sampling_high <= 1")
        if self.ref_kl_controller == "adaptive" and not (self.ref_kl_target > 0 and self.ref_kl_horizon > 0):
            raise ValueError("algorithm: the adaptive KL controller needs ref_kl_target, ref_kl_horizon > 0")
        if self.ref_kl_in_reward and not self.ref_kl_coef:
            raise ValueError("algorithm.ref_kl_in_reward needs ref_kl_coef > 0 (the start value)")
        if self.max_tries < 1:
            raise ValueError(f"algorithm.max_tries must be >= 1, got {self.max_tries}")
        if self.global_token_mean and self.loss_agg_mode != "token-mean":
            raise ValueError(
                f"algorithm.global_token_mean needs loss_agg_mode 'token-mean', got {self.loss_agg_mode!r}"
            )
        if self.kl_prc_estimator == "exact" and self.gamma and not self.masked_grad:
            # the exact KL needs masked logits in the update pass: they come from the doubled micro-batch
            raise ValueError(
                "algorithm.kl_prc_estimator 'exact' needs masked logits in the update: set "
                "algorithm.masked_grad=true"
            )
        if self.entropy_estimator == "exact" and self.eta2 and not self.masked_grad:
            raise ValueError(
                "algorithm.entropy_estimator 'exact' with eta2 > 0 needs masked logits: set "
                "algorithm.masked_grad=true"
            )

        if not 0 < self.vppo_top_k <= 1 or not 0 < self.vppo_beta_min <= 1:
            raise ValueError(
                f"algorithm: need vppo_top_k and vppo_beta_min in (0, 1], got {self.vppo_top_k}, "
                f"{self.vppo_beta_min}"
            )
        if self.vppo_beta_max is not None and self.vppo_beta_max < self.vppo_beta_min:
            raise ValueError("algorithm.vppo_beta_max must be >= vppo_beta_min (or null: dynamic)")
        from megatron_papo.objectives.registry import build_objective

        build_objective(self)  # an unknown objective, or one that refuses these coefficients, fails here

    @property
    def uses_masked_images(self) -> bool:
        return bool(self.gamma or self.eta2)

    @property
    def masked_in_update(self) -> bool:
        """Masked-image logits come through the update pass (a doubled micro-batch) with gradient."""
        return self.masked_grad and self.uses_masked_images

    @property
    def uses_ref_kl(self) -> bool:
        """The reference model's log-probs are needed (as a loss term or as a reward penalty)."""
        return bool(self.ref_kl_coef)

    @property
    def ref_kl_in_loss(self) -> bool:
        return self.uses_ref_kl and not self.ref_kl_in_reward

    def anneal_factor(self, progress: float) -> float:
        """The factor on gamma and the entropy coefficients at ``progress`` in [0, 1] of training."""
        if self.gamma_anneal == "none":
            return 1.0
        t = min(progress / self.gamma_anneal_fraction, 1.0)
        return self.gamma_start + (self.gamma_end - self.gamma_start) * t
