"""The PAPO objective against float64 single-process math written from the spec, at TP = 1, 2, 4."""

import math

import pytest
import torch
from multiprocess import run_distributed

from megatron_papo.objectives.pieces import TokenCounts
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
    "top_p_by_count": dict(
        name="papo_g",
        masked_grad=True,
        kl_prc_token_clip=0.2,
        kl_prc_top_p=0.3,
        kl_prc_top_p_select="count",
        gamma=0.5,
        global_token_mean=True,
    ),
    "top_p_quantile_global_mean": dict(name="papo_d", kl_prc_top_p=0.4, gamma=0.5, global_token_mean=True),
    "k2_seq_mean_annealed": dict(
        name="papo_d",
        masked_grad=True,
        kl_prc_estimator="k2",
        loss_agg_mode="seq-mean-token-mean",
        gamma_anneal="linear",
        gamma_end=0.2,
    ),
    "k1_seq_sum": dict(name="papo_g", kl_prc_estimator="k1", loss_agg_mode="seq-mean-token-sum"),
    "k2_clamped_entropy_by_mode": dict(
        name="papo_g",
        kl_prc_estimator="k2",
        kl_prc_clamp=0.5,
        kl_prc_clamp_all=True,
        loss_agg_mode="seq-mean-token-mean",
        entropy_agg="loss_agg_mode",
    ),
    "sft_ref_k1": dict(name="papo_g", use_sft_loss=True, sft_loss_coef=0.3, ref_kl_estimator="k1"),
    "sft_global_mean": dict(name="grpo", use_sft_loss=True, sft_loss_coef=0.3, global_token_mean=True),
}
TEMPERATURE, PROGRESS = 0.8, 0.5
# whole-mini-batch counts (global token-mean): response tokens, kept KL_prc tokens, correct-rollout tokens
GLOBAL = TokenCounts(response=40.0, kl_prc=17.0, sft=23.0)
SFT_WEIGHTS = torch.tensor([1.0, 0.0, 1.0])  # rollouts 0 and 2 are correct


def _quantile_keep(kl, mask, top_p):
    """The reference's top-p selection, by hand: per sample, linear interpolation of the sorted response
    tokens' KL at 1 - top_p; tokens >= it kept."""
    keep = torch.zeros_like(mask)
    for i in range(B):
        values = kl[i][mask[i] > 0].detach().sort().values
        position = (1 - top_p) * (len(values) - 1)
        low, high = math.floor(position), math.ceil(position)
        threshold = values[low] + (values[high] - values[low]) * (position - low)
        keep[i] = ((kl[i].detach() >= threshold) & (mask[i] > 0)).to(mask.dtype)
    return keep


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

    def agg(x, m=mask, mode=cfg.loss_agg_mode, count=GLOBAL.response):
        if mode == "token-mean":
            return (x * m).sum() / (count if cfg.global_token_mean else m.sum())
        if mode == "seq-mean-token-mean":
            return ((x * m).sum(-1) / m.sum(-1)).mean()
        return (x * m).sum(-1).mean()

    entropy_mode = "token-mean" if cfg.entropy_agg == "token-mean" else cfg.loss_agg_mode

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
        if cfg.kl_prc_estimator in ("k3", "k3_inverted", "exact") or cfg.kl_prc_clamp_all:
            kl = torch.clamp(kl, -cfg.kl_prc_clamp, cfg.kl_prc_clamp)  # the reference clamps only k3
        clip = (lambda x: torch.clamp(x, 0, cfg.kl_prc_token_clip)) if cfg.kl_prc_token_clip else None
        if cfg.kl_prc_top_p is None:
            loss = loss - cfg.gamma * factor * agg(clip(kl) if clip else kl)
        elif cfg.kl_prc_top_p_select == "quantile":  # select, zero the rest, clip, mean over ALL tokens
            kl = kl * _quantile_keep(kl, mask, cfg.kl_prc_top_p)
            loss = loss - cfg.gamma * factor * agg(clip(kl) if clip else kl)
        else:  # clip, then exactly ceil(p * n) tokens, mean over the kept
            kl = clip(kl) if clip else kl
            keep = torch.zeros_like(mask)
            for i in range(B):
                n = math.ceil(float(mask[i].sum()) * cfg.kl_prc_top_p)
                scores = torch.where(mask[i] > 0, kl[i].detach(), torch.tensor(-1e9, dtype=kl.dtype))
                keep[i, scores.topk(n).indices] = 1
            loss = loss - cfg.gamma * factor * agg(kl, keep, count=GLOBAL.kl_prc)
    exact = cfg.entropy_estimator == "exact"
    if cfg.eta1:
        h = -(log_p.exp() * log_p).sum(-1) if exact else -lp
        loss = loss + cfg.eta1 * factor * agg(h, mode=entropy_mode)
    if cfg.eta2:
        h = -(log_q.exp() * log_q).sum(-1) if exact else -lp_mask
        loss = loss + cfg.eta2 * factor * agg(h, mode=entropy_mode)
    if cfg.ref_kl_coef:
        d = ref - lp
        ref_kl = -d if cfg.ref_kl_estimator == "k1" else torch.clamp(torch.exp(d) - d - 1, -10, 10)
        loss = loss + cfg.ref_kl_coef * agg(ref_kl)
    if cfg.use_sft_loss:  # NLL token-mean over the correct rollouts' tokens, whatever the mode
        correct = mask * SFT_WEIGHTS.to(mask.dtype)[:, None]
        loss = loss + cfg.sft_loss_coef * agg(-lp, correct, mode="token-mean", count=GLOBAL.sft)
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
        sft_weights=SFT_WEIGHTS if cfg.use_sft_loss else None,
        temperature=TEMPERATURE,
        progress=PROGRESS,
        global_counts=GLOBAL if cfg.global_token_mean else None,
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


def _term_grads(name: str, coef: float):
    """The gradient (logits, masked logits) of one term, coefficient times its float64 formula."""
    logits, masked, labels, mask, old, ref, adv = [
        x.double() if x.is_floating_point() else x for x in _inputs()
    ]
    logits.requires_grad_()
    masked.requires_grad_()
    finite = lambda x: torch.where(torch.isinf(x), torch.full_like(x, -1e5), x)  # noqa: E731
    lp = torch.log_softmax(finite(logits) / TEMPERATURE, -1).gather(-1, labels[..., None])[..., 0]
    lp_mask = torch.log_softmax(finite(masked) / TEMPERATURE, -1).gather(-1, labels[..., None])[..., 0]
    mean = lambda x, m=mask: (x * m).sum() / m.sum()  # noqa: E731
    d_mask, d_ref = lp_mask - lp, ref - lp
    term = {
        "gamma": lambda: -mean(torch.clamp(torch.exp(d_mask) - d_mask - 1, -10, 10)),
        "eta1": lambda: mean(-lp),
        "eta2": lambda: mean(-lp_mask),
        "ref_kl_coef": lambda: mean(torch.clamp(torch.exp(d_ref) - d_ref - 1, -10, 10)),
        "sft_loss_coef": lambda: mean(-lp, mask * SFT_WEIGHTS.double()[:, None]),
    }[name]()
    (coef * term).backward()
    return logits.grad, masked.grad


@pytest.mark.parametrize("term", ["gamma", "eta1", "eta2", "ref_kl_coef", "sft_loss_coef"])
def test_each_papo_term_alone_changes_the_gradient_by_its_float64_amount(term):
    """GRPO's surrogate plus one PAPO term: the gradient moves by exactly that term's float64 gradient
    (with masked_grad, so the masked-image terms reach the masked logits too)."""
    off = dict(gamma=0.0, eta1=0.0, eta2=0.0, ref_kl_coef=0.0, use_sft_loss=False)
    base = dict(name="papo_g", masked_grad=True, **off)
    coef = 0.37
    on = base | {term: coef} | ({"use_sft_loss": True} if term == "sft_loss_coef" else {})
    _, grad0, masked0, _ = _ours(AlgorithmConfig(**base), _inputs(), 0, 1)
    _, grad1, masked1, _ = _ours(AlgorithmConfig(**on), _inputs(), 0, 1)
    want, want_masked = (g if g is not None else torch.zeros_like(grad0) for g in _term_grads(term, coef))
    torch.testing.assert_close(grad1 - grad0, want, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(masked1 - masked0, want_masked, rtol=1e-7, atol=1e-10)
    assert float((grad1 - grad0).abs().max()) + float((masked1 - masked0).abs().max()) > 1e-4


def test_bf16_logits_count_and_sum_in_float32():
    """bf16 logits: 5,009 response tokens, each with pg = -1.28 (ratio 1, advantage 1.28), give exactly
    -1.28 (float64: -1.28), and the top-p count keeps exactly ceil(p * tokens)."""
    from megatron_papo.objectives.pieces import local_token_counts, top_p_by_count
    from megatron_papo.ops.vocab_parallel import log_probs_and_entropy

    g = torch.Generator().manual_seed(0)
    tokens, vocab = 5200, 16
    logits = torch.randn(1, tokens, vocab, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    mask = torch.zeros(1, tokens)
    mask[0, 100:5109] = 1  # 5,009 tokens: bf16 rounds the count to 5,024
    assert float(mask.to(torch.bfloat16).sum()) != 5009
    old = log_probs_and_entropy(logits[0], labels[0])[0][None]  # ratio 1 on every token
    cfg = AlgorithmConfig(name="grpo", ref_kl_coef=0.0)
    loss, metrics = papo_loss(cfg, logits, labels, mask, torch.tensor([1.28]), old)
    assert abs(float(loss) - (-1.28)) < 1e-6 and abs(metrics["actor/pg_loss"] - (-1.28)) < 1e-6
    assert float(local_token_counts(cfg, mask)[0]) == 5009
    kl = torch.rand(1, tokens, generator=g).to(torch.bfloat16)
    assert int(top_p_by_count(kl, mask, 0.2).sum()) == math.ceil(5009 * 0.2)
    counts = local_token_counts(AlgorithmConfig(kl_prc_top_p=0.2, kl_prc_top_p_select="count"), mask)
    assert float(counts[1]) == math.ceil(5009 * 0.2)
    # the global token-mean path: a sum over the whole count, in float32
    loss, _ = papo_loss(
        cfg, logits, labels, mask, torch.tensor([1.28]), old, global_counts=TokenCounts(5009.0, 5009.0, 1.0)
    )
    assert abs(float(loss) - (-1.28)) < 1e-6


def test_reference_top_p_differs_from_the_count_variant_by_its_denominator():
    """The reference divides the kept tokens' KL sum by all response tokens: on a sample whose KL is
    all equal (ties kept), quantile keeps every token and the count variant only ceil(p * n)."""
    from megatron_papo.objectives.pieces import top_p_by_count, top_p_by_quantile

    mask = torch.tensor([[0.0, 1, 1, 1, 1, 1, 0]])
    kl = torch.tensor([[9.0, 0.5, 0.5, 0.5, 0.5, 0.5, 9.0]])
    assert torch.equal(top_p_by_quantile(kl, mask, 0.2), mask)  # ties at the threshold are kept
    assert int(top_p_by_count(kl, mask, 0.2).sum()) == 1
    kl = torch.tensor([[9.0, 0.1, 0.4, 0.3, 0.2, 0.5, 9.0]])
    assert top_p_by_quantile(kl, mask, 0.2).tolist() == [[0, 0, 0, 0, 0, 1, 0]]  # padding never kept


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
        "papo/entropy_sample",
        "papo/masked_entropy_sample",
        "actor/ref_kl",
        "actor/approx_kl",
        "actor/ratio_dev_max",
    ):
        assert math.isfinite(metrics[key]), key
    assert 0 < metrics["actor/pg_clipfrac"] < 1 and metrics["papo/kl_prc"] > 0
    assert "papo/masked_entropy" not in metrics  # exact masked entropy needs the masked logits
    _, _, _, metrics = _ours(AlgorithmConfig(name="papo_g", masked_grad=True), _inputs(), 0, 1)
    assert metrics["papo/masked_entropy"] > 0 and metrics["papo/masked_entropy_sample"] > 0


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
