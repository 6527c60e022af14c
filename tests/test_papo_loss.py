"""The PAPO objective against float64 single-process math written from the spec, at TP = 1, 2, 4."""

import math

import pytest
import torch
from multiprocess import run_distributed

from megatron_papo.papo.config import AlgorithmConfig
from megatron_papo.papo.loss import papo_loss
from megatron_papo.rollout.correction import logprob_mismatch, truncated_importance_weights

B, S, V = 3, 7, 32

CONFIGS = {
    "grpo": dict(name="grpo"),
    "papo_g_reference": dict(name="papo_g"),
    "papo_d_masked_grad": dict(name="papo_d", masked_grad=True, global_token_mean=True),
    "exact_kl_entropy": dict(
        name="papo_g", masked_grad=True, kl_prc_estimator="exact", entropy_estimator="exact"
    ),
    "inverted_clipped_top_p": dict(
        name="papo_g",
        masked_grad=True,
        kl_prc_estimator="k3_inverted",
        kl_prc_token_clip=0.2,
        kl_prc_top_p=0.5,
        gamma=0.5,
    ),
    "k2_seq_mean_annealed": dict(
        name="papo_d",
        masked_grad=True,
        kl_prc_estimator="k2",
        loss_agg_mode="seq-mean-token-mean",
        gamma_anneal="linear",
        gamma_end=0.2,
    ),
    "k1_seq_sum": dict(name="papo_g", kl_prc_estimator="k1", loss_agg_mode="seq-mean-token-sum"),
}
TEMPERATURE, PROGRESS, GLOBAL_TOKENS = 0.8, 0.5, 40.0


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 3
    logits[0, 1] *= 50  # extreme magnitudes
    logits[1, 2, ::4] = -torch.inf  # masked vocabulary entries
    masked = logits + torch.randn(B, S, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[1, 2] = 1
    mask = torch.zeros(B, S, dtype=torch.float64)
    mask[0, 2:6], mask[1, 1:7], mask[2, 3:5] = 1, 1, 1
    lp_now = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, labels[..., None]).squeeze(-1)
    old = lp_now + 0.3 * torch.randn(B, S, generator=g, dtype=torch.float64)  # ratios both sides of the clip
    old[0, 3] = lp_now[0, 3] - 5  # far outside the clip range
    old[1, 3] = lp_now[1, 3] - 2  # ratio e^2 > clip_dual with a negative advantage: dual clip acts
    ref = lp_now + 0.2 * torch.randn(B, S, generator=g, dtype=torch.float64)
    advantages = torch.tensor([1.3, -0.7, 0.4], dtype=torch.float64)
    return [
        x.to(dtype) if x.is_floating_point() else x
        for x in (logits, masked, labels, mask, old, ref, advantages)
    ]


def _spec_loss(cfg: AlgorithmConfig, logits, masked, labels, mask, old, ref, adv):
    """The spec, line by line, float64, with the full vocabulary at hand."""
    finite = lambda x: torch.where(torch.isinf(x), torch.full_like(x, -1e5), x)  # noqa: E731
    log_p = torch.log_softmax(finite(logits) / TEMPERATURE, -1)
    log_q = torch.log_softmax(finite(masked) / TEMPERATURE, -1)
    lp = log_p.gather(-1, labels[..., None]).squeeze(-1)
    lp_mask = log_q.gather(-1, labels[..., None]).squeeze(-1)
    if not cfg.masked_grad:
        lp_mask = lp_mask.detach()

    def agg(x, m=mask):
        if cfg.loss_agg_mode == "token-mean":
            return (x * m).sum() / (GLOBAL_TOKENS if cfg.global_token_mean else m.sum())
        if cfg.loss_agg_mode == "seq-mean-token-mean":
            return ((x * m).sum(-1) / m.sum(-1)).mean()
        return (x * m).sum(-1).mean()

    r = torch.exp(torch.clamp(lp - old, -20, 20))
    a = adv[:, None]
    pg = torch.maximum(-a * r, -a * torch.clamp(r, 1 - cfg.eps_low, 1 + cfg.eps_high))
    pg = torch.where(a < 0, torch.minimum(pg, -a * 3.0), pg)
    factor = 1.0 if cfg.gamma_anneal == "none" else 1.0 + (cfg.gamma_end - 1.0) * PROGRESS
    loss = agg(pg)
    if cfg.gamma:
        if cfg.kl_prc_estimator == "exact":
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        else:
            d = lp_mask - lp
            if cfg.kl_prc_estimator == "k3_inverted":
                d = -d
            kl = {"k1": -d, "k2": 0.5 * d**2}.get(cfg.kl_prc_estimator, torch.exp(d) - d - 1)
        kl = torch.clamp(kl, -10, 10)
        if cfg.kl_prc_token_clip is not None:
            kl = torch.clamp(kl, 0, cfg.kl_prc_token_clip)
        keep = mask
        if cfg.kl_prc_top_p is not None:
            keep = torch.zeros_like(mask)
            for i in range(B):
                n = math.ceil(float(mask[i].sum()) * cfg.kl_prc_top_p)
                scores = torch.where(mask[i] > 0, kl[i].detach(), torch.tensor(-1e9, dtype=kl.dtype))
                keep[i, scores.topk(n).indices] = 1
        loss = loss - cfg.gamma * factor * agg(kl, keep)
    exact = cfg.entropy_estimator == "exact"
    if cfg.eta1:
        h = -(log_p.exp() * log_p).sum(-1) if exact else -lp
        loss = loss + cfg.eta1 * factor * agg(h)
    if cfg.eta2:
        h = -(log_q.exp() * log_q).sum(-1) if exact else -lp_mask
        loss = loss + cfg.eta2 * factor * agg(h)
    if cfg.ref_kl_coef:
        d = ref - lp
        loss = loss + cfg.ref_kl_coef * agg(torch.clamp(torch.exp(d) - d - 1, -10, 10))
    return loss


def _ours(cfg, inputs, rank, world):
    logits, masked, labels, mask, old, ref, adv = inputs
    shard = V // world
    local = logits[..., rank * shard : (rank + 1) * shard].clone().requires_grad_()
    local_masked = masked[..., rank * shard : (rank + 1) * shard].clone().requires_grad_()
    masked_lp = torch.log_softmax(masked / TEMPERATURE, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    loss, metrics = papo_loss(
        cfg,
        local,
        labels,
        mask,
        adv,
        old,
        masked_logits=local_masked if cfg.masked_grad else None,
        masked_log_probs=None if cfg.masked_grad else masked_lp,
        ref_log_probs=ref,
        temperature=TEMPERATURE,
        progress=PROGRESS,
        global_token_count=GLOBAL_TOKENS if cfg.global_token_mean else None,
    )
    loss.backward()
    grad_masked = local_masked.grad if local_masked.grad is not None else torch.zeros_like(local_masked)
    return float(loss), local.grad, grad_masked, {k: float(v) for k, v in metrics.items()}


def _reference(cfg, dtype):
    logits, masked, labels, mask, old, ref, adv = [
        x.double() if x.is_floating_point() else x for x in _inputs(dtype)
    ]
    logits.requires_grad_()
    masked.requires_grad_()
    loss = _spec_loss(cfg, logits, masked, labels, mask, old, ref, adv)
    loss.backward()
    return float(loss), logits.grad, masked.grad if masked.grad is not None else torch.zeros_like(masked)


def _all_configs(rank: int = 0, world: int = 1):
    return {
        (name, dtype): _ours(AlgorithmConfig(**kw), _inputs(dtype), rank, world)
        for name, kw in CONFIGS.items()
        for dtype in (torch.float64, torch.float32)
    }


def _check(world, rank, per_config):
    cols = slice(rank * V // world, (rank + 1) * V // world)
    for (name, dtype), (loss, grad, grad_masked, _) in per_config.items():
        ref_loss, ref_grad, ref_grad_masked = _reference(AlgorithmConfig(**CONFIGS[name]), dtype)
        tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        where = f"{name} {dtype} TP={world} rank {rank}"
        torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref_loss), **tol, msg=where)
        torch.testing.assert_close(grad.double(), ref_grad[..., cols], **tol, msg=f"grad {where}")
        torch.testing.assert_close(
            grad_masked.double(), ref_grad_masked[..., cols], **tol, msg=f"masked grad {where}"
        )


def _distributed():
    """World of 4: megatron-core's TP group at TP=4, then re-laid out at TP=2 (x DP=2)."""
    from megatron.core import parallel_state as ps

    out = {}
    for world in (4, 2):
        if ps.get_tensor_model_parallel_world_size() != world:
            ps.destroy_model_parallel()
            ps.initialize_model_parallel(tensor_model_parallel_size=world)
        rank = ps.get_tensor_model_parallel_rank()
        out[world] = (rank, _all_configs(rank, world))
    return out


def test_objective_single_process():
    _check(1, 0, _all_configs())


def test_objective_tensor_parallel():
    for per_rank in run_distributed(_distributed, 4, tp=4):
        for world, (rank, per_config) in per_rank.items():
            _check(world, rank, per_config)


def test_reference_default_masked_entropy_is_inert_and_masked_grad_activates_it():
    """Reference: lp_mask carries no gradient, so eta2 changes nothing; masked_grad gives it gradient."""
    inputs = _inputs()
    base = dict(name="papo_g", gamma=0.0, ref_kl_coef=0.0, eta1=0.0)
    _, g0, gm0, _ = _ours(AlgorithmConfig(**base, eta2=0.0), inputs, 0, 1)
    _, g1, gm1, _ = _ours(AlgorithmConfig(**base, eta2=0.5), inputs, 0, 1)
    assert torch.equal(g0, g1) and float(gm1.abs().sum()) == 0
    _, _, gm2, _ = _ours(AlgorithmConfig(**base, eta2=0.5, masked_grad=True), inputs, 0, 1)
    assert float(gm2.abs().sum()) > 1e-3


@pytest.mark.parametrize(
    "plain, papo",
    [
        (dict(name="grpo"), dict(name="papo_g")),
        (dict(name="grpo", ref_kl_coef=0.0), dict(name="papo_g", ref_kl_coef=0.0, masked_grad=True)),
        (dict(name="dapo"), dict(name="papo_d", masked_grad=True, kl_prc_estimator="exact")),
    ],
)
def test_papo_with_zero_coefficients_is_grpo_exactly(plain, papo):
    inputs = _inputs()
    zero = dict(gamma=0.0, eta1=0.0, eta2=0.0)
    loss, grad, grad_masked, _ = _ours(AlgorithmConfig(**plain), inputs, 0, 1)
    papo_loss_, papo_grad, papo_grad_masked, _ = _ours(AlgorithmConfig(**papo, **zero), inputs, 0, 1)
    assert loss == papo_loss_ and torch.equal(grad, papo_grad)
    assert float(grad_masked.abs().sum()) == 0 and float(papo_grad_masked.abs().sum()) == 0


def test_padding_values_are_ignored():
    """Whatever padding holds (NaN log-probs, -100 labels), the loss and gradients are unchanged."""
    cfg = AlgorithmConfig(name="papo_g")
    clean = _ours(cfg, _inputs(), 0, 1)
    logits, masked, labels, mask, old, ref, adv = _inputs()
    pad = mask == 0
    dirty = _ours(
        cfg,
        [
            logits,
            masked,
            labels.masked_fill(pad, -100),
            mask,
            old.masked_fill(pad, torch.nan),
            ref.masked_fill(pad, 1e4),
            adv,
        ],
        0,
        1,
    )
    assert clean[0] == dirty[0] and torch.equal(clean[1], dirty[1])


def test_truncated_importance_sampling_weights_the_policy_gradient_only():
    """TIS: the pg term of each token times min(pi_old / pi_rollout, cap); weights of 1 change nothing, the
    other terms are untouched, padding weights are ignored, and the mismatch is mean |lp_old - lp_rollout|."""
    logits, masked, labels, mask, old, ref, adv = _inputs()
    cfg = AlgorithmConfig(name="grpo", ref_kl_coef=0.0)
    rollout = old + 0.5 * torch.randn(old.shape, generator=torch.Generator().manual_seed(5), dtype=old.dtype)
    weights = truncated_importance_weights(old, rollout, mask, cap=1.5)
    assert weights.max() <= 1.5 and torch.equal(weights[mask == 0], torch.zeros_like(weights[mask == 0]))
    assert torch.allclose(weights[mask > 0], torch.exp(old - rollout)[mask > 0].clamp(max=1.5).float())
    assert logprob_mismatch(old, rollout, mask) == pytest.approx(
        float(((old - rollout).abs() * mask).sum() / mask.sum())
    )

    def loss(w):
        x = logits.clone().requires_grad_()
        out, metrics = papo_loss(cfg, x, labels, mask, adv, old, rollout_is_weights=w)
        out.backward()
        return out, x.grad, metrics

    plain, plain_grad, _ = loss(None)
    ones, ones_grad, metrics = loss(torch.where(mask > 0, 1.0, torch.nan).to(old.dtype))  # NaN padding
    assert plain == ones and torch.equal(plain_grad, ones_grad) and metrics["actor/tis_weight"] == 1
    w = weights.double()
    weighted, weighted_grad, _ = loss(w)
    # the loss is linear in the per-token weights: sum over tokens t of w_t * (loss with weight 1 on t only)
    one_hot = [
        torch.zeros_like(w).index_put_((i, j), torch.tensor(1.0, dtype=w.dtype)) for i, j in mask.nonzero()
    ]
    assert float(weighted) == pytest.approx(sum(float(w[e > 0]) * float(loss(e)[0]) for e in one_hot))
    assert not torch.allclose(weighted_grad, plain_grad)
    with pytest.raises(ValueError, match=r"rollout_is_weights must be \[3, 7\]"):
        papo_loss(cfg, logits, labels, mask, adv, old, rollout_is_weights=w[:, :-1])


def test_bad_input_is_refused():
    logits, masked, labels, mask, old, ref, adv = _inputs()
    cfg = AlgorithmConfig(name="grpo")
    with pytest.raises(ValueError, match=r"labels, loss_mask and old_log_probs must be \[3, 7\]"):
        papo_loss(cfg, logits, labels[:, :-1], mask, adv, old, ref_log_probs=ref)
    with pytest.raises(ValueError, match=r"advantages must be \[3\]"):
        papo_loss(cfg, logits, labels, mask, adv[:2], old, ref_log_probs=ref)
    with pytest.raises(
        ValueError, match=r"old_log_probs is not finite on response tokens, at indices \[\[0, 2\]\]"
    ):
        papo_loss(
            cfg,
            logits,
            labels,
            mask,
            adv,
            old.index_put((torch.tensor(0), torch.tensor(2)), torch.tensor(torch.nan, dtype=old.dtype)),
            ref_log_probs=ref,
        )
    with pytest.raises(ValueError, match="advantages must be finite"):
        papo_loss(cfg, logits, labels, mask, adv * torch.inf, old, ref_log_probs=ref)
    with pytest.raises(ValueError, match=r"needs ref_log_probs \[3, 7\]"):
        papo_loss(cfg, logits, labels, mask, adv, old)
    with pytest.raises(ValueError, match=r"masked_logits \(3, 7, 31\) must match logits"):
        papo_loss(
            AlgorithmConfig(name="papo_d", masked_grad=True),
            logits,
            labels,
            mask,
            adv,
            old,
            masked_logits=masked[..., 1:],
        )
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 32\)"):
        papo_loss(cfg, logits, labels.masked_fill(mask > 0, V), mask, adv, old, ref_log_probs=ref)
    with pytest.raises(ValueError, match="logits holds NaN"):
        papo_loss(cfg, logits * torch.nan, labels, mask, adv, old, ref_log_probs=ref)
    with pytest.raises(ValueError, match="needs the masked image"):
        papo_loss(AlgorithmConfig(name="papo_d"), logits, labels, mask, adv, old)


def test_metrics_report_clipping_and_kl():
    _, _, _, metrics = _ours(AlgorithmConfig(name="papo_g"), _inputs(), 0, 1)
    for key in (
        "actor/pg_clipfrac",
        "actor/pg_clipfrac_high",
        "papo/kl_prc",
        "papo/entropy",
        "papo/masked_entropy",
        "actor/ref_kl",
        "actor/approx_kl",
    ):
        assert math.isfinite(metrics[key]), key
    assert 0 < metrics["actor/pg_clipfrac"] < 1 and metrics["papo/kl_prc"] > 0


def test_config_presets_and_errors():
    assert AlgorithmConfig(name="papo_d").eps_high == 0.28 and AlgorithmConfig(name="papo_d").dynamic_sampling
    assert AlgorithmConfig(name="papo_g", gamma=0.04).gamma == 0.04  # explicit values beat the preset
    assert not AlgorithmConfig(name="dapo").uses_ref_kl and AlgorithmConfig(name="grpo").uses_ref_kl
    with pytest.raises(ValueError, match="needs loss_agg_mode 'token-mean'"):
        AlgorithmConfig(global_token_mean=True, loss_agg_mode="seq-mean-token-sum")
    with pytest.raises(ValueError, match="set algorithm.masked_grad=true"):
        AlgorithmConfig(kl_prc_estimator="exact")
    with pytest.raises(ValueError, match="algorithm.gamma must be >= 0"):
        AlgorithmConfig(gamma=-1.0)
    with pytest.raises(ValueError, match="algorithm.eta2 must be >= 0, got -1"):
        AlgorithmConfig(eta2=-1)
    with pytest.raises(
        ValueError, match=r"algorithm.name must be one of \['grpo', 'dapo', 'papo_g', 'papo_d'\]"
    ):
        AlgorithmConfig(name="ppo")
    with pytest.raises(ValueError, match="algorithm.kl_prc_estimator must be one of .* got 'k4'"):
        AlgorithmConfig(kl_prc_estimator="k4")
    with pytest.raises(ValueError, match="algorithm.loss_agg_mode must be one of"):
        AlgorithmConfig(loss_agg_mode="token-sum")
    with pytest.raises(ValueError, match="eps_low < 1"):
        AlgorithmConfig(eps_low=1.5)
