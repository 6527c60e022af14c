"""The objectives beyond PAPO (``vppo``, ``papo_vppo``) against float64 single-process math written from
their formulas (``docs/objectives.md``), at TP = 1 and 2; VPPO's ``prepare`` DP-invariant in its default
scope; TP=2 x PP=2 micro-steps of a megatron-core GPT with ``vppo`` and with ``papo_vppo`` (masked branch
with gradient) equal to TP=1. One spawn of four processes runs every distributed check."""

import math
import os

import pytest
import torch
from multiprocess import run_distributed
from test_gpt_microstep import _relayout, _run, check_microstep

from megatron_papo.objectives.pieces import TokenCounts
from megatron_papo.objectives.registry import LossContext, LossInputs, StepTokens, build_objective
from megatron_papo.papo.config import AlgorithmConfig

B, S, V = 4, 8, 32
MICRO_BATCH = 2
TEMPERATURE, PROGRESS = 0.8, 0.5
GLOBAL = TokenCounts(response=50.0, kl_prc=50.0, sft=1.0)
CONFIGS = {
    "vppo_recipe": dict(name="dapo", objective="vppo", global_token_mean=True),
    "vppo_official_scope": dict(
        name="dapo", objective="vppo", vppo_tas_scope="rank_micro_batch", loss_agg_mode="seq-mean-token-mean"
    ),
    "vppo_fixed_beta_max_ref_kl": dict(
        name="grpo", objective="vppo", vppo_beta_min=0.8, vppo_beta_max=1.2, vppo_top_k=0.25
    ),
    "papo_vppo": dict(name="papo_d", objective="papo_vppo", gamma=0.5, global_token_mean=True),
    "papo_vppo_masked_grad": dict(
        name="papo_g", objective="papo_vppo", gamma=0.5, masked_grad=True, vppo_tas_scope="rank_micro_batch"
    ),
}
MICROSTEPS = {
    "vppo": AlgorithmConfig(name="dapo", objective="vppo", vppo_top_k=0.5, global_token_mean=True),
    "papo_vppo": AlgorithmConfig(
        name="papo_g",
        objective="papo_vppo",
        gamma=0.2,
        masked_grad=True,
        vppo_top_k=0.5,
        global_token_mean=True,
    ),
}


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 3
    logits[1, 2, ::4] = -torch.inf  # masked vocabulary entries
    masked = logits + torch.randn(B, S, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[1, 2] = 1
    mask = torch.zeros(B, S, dtype=torch.float64)
    mask[0, 1:6], mask[1, 2:8], mask[2, 0:3], mask[3, 3:7] = 1, 1, 1, 1
    lp_now = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, labels[..., None])[..., 0]
    old = lp_now + 0.3 * torch.randn(B, S, generator=g, dtype=torch.float64)
    old[1, 3] = lp_now[1, 3] - 2  # ratio e^2 > clip_dual with a negative advantage: dual clip acts
    masked_lp = old + 0.8 * torch.randn(B, S, generator=g, dtype=torch.float64)  # the no-grad masked pass
    masked_lp[2, 1] = old[2, 1] + 25  # beyond the +-20 clamp: S_t saturates at 10
    ref = lp_now + 0.2 * torch.randn(B, S, generator=g, dtype=torch.float64)
    advantages = torch.tensor([1.3, -0.7, 0.4, -1.1], dtype=torch.float64)
    return [
        x.to(dtype) if x.is_floating_point() else x
        for x in (logits, masked, labels, mask, old, masked_lp, ref, advantages)
    ]


def _spec_factors(cfg: AlgorithmConfig, old, masked_lp, mask):
    """VPPO's per-step quantities from its formulas: S_t, the top-k mask, alpha_i."""
    d = torch.clamp(masked_lp - old, -20, 20)
    dependency = torch.clamp(torch.exp(d) - d - 1, 0, 10) * mask
    keep = torch.zeros_like(mask)
    for i in range(B):
        k = math.ceil(float(mask[i].sum()) * cfg.vppo_top_k)
        keep[i, torch.where(mask[i] > 0, dependency[i], -1.0).topk(k).indices] = 1
    mean = dependency.sum(-1) / mask.sum(-1)
    normalized = (mean - mean.min()) / (mean.max() - mean.min())
    beta_min = cfg.vppo_beta_min
    if cfg.vppo_beta_max is not None:
        return dependency, keep, beta_min + normalized * (cfg.vppo_beta_max - beta_min)
    alpha = torch.empty(B, dtype=mask.dtype)
    scope = MICRO_BATCH if cfg.vppo_tas_scope == "rank_micro_batch" else B
    for start in range(0, B, scope):
        n = normalized[start : start + scope]
        alpha[start : start + scope] = beta_min + (1 - beta_min) * n / (n.mean() + 1e-8)
    return dependency, keep, alpha


def _spec_loss(cfg: AlgorithmConfig, logits, masked, labels, mask, old, masked_lp, ref, adv):
    """The objective, line by line, float64, with the full vocabulary at hand; (loss, vppo metrics)."""
    dependency, keep, alpha = _spec_factors(cfg, old, masked_lp, mask)
    finite = lambda x: torch.where(torch.isinf(x), torch.full_like(x, -1e5), x)  # noqa: E731
    lp = torch.log_softmax(finite(logits) / TEMPERATURE, -1).gather(-1, labels[..., None])[..., 0]
    lp_q = torch.log_softmax(finite(masked) / TEMPERATURE, -1).gather(-1, labels[..., None])[..., 0]
    lp_mask = lp_q if cfg.masked_grad else masked_lp
    tokens = GLOBAL.response if cfg.global_token_mean else mask.sum()
    mean = lambda x: (x * mask).sum() / tokens  # noqa: E731
    agg = mean if cfg.loss_agg_mode == "token-mean" else lambda x: ((x * mask).sum(-1) / mask.sum(-1)).mean()

    a = (adv * alpha)[:, None]
    r = torch.exp(torch.clamp(lp - old, -20, 20))
    pg = torch.maximum(-a * r, -a * torch.clamp(r, 1 - cfg.eps_low, 1 + cfg.eps_high))
    pg = torch.where(a < 0, torch.minimum(pg, -a * 3.0), pg)
    loss = agg(keep * pg)
    if cfg.objective == "vppo":
        loss = loss + cfg.vppo_entropy_coef * mean(-lp)
    else:
        d = lp_mask - lp
        kl = torch.clamp(torch.exp(d) - d - 1, -10, 10)
        loss = loss + cfg.eta1 * mean(-lp) - cfg.gamma * agg(kl) + cfg.eta2 * mean(-lp_mask)
    if cfg.ref_kl_coef:
        d = ref - lp
        loss = loss + cfg.ref_kl_coef * agg(torch.clamp(torch.exp(d) - d - 1, -10, 10))
    metrics = {
        "vppo/dependency": float((dependency * mask).sum() / mask.sum()),
        "vppo/alpha_min": float(alpha.min()),
        "vppo/alpha_max": float(alpha.max()),
        "vppo/kept_fraction": float(keep.sum() / mask.sum()),
    }
    return loss, metrics


def _ours(cfg: AlgorithmConfig, inputs, rank: int = 0, world: int = 1):
    logits, masked, labels, mask, old, masked_lp, ref, adv = inputs
    shard = V // world
    local = logits[..., rank * shard : (rank + 1) * shard].clone().requires_grad_()
    local_masked = masked[..., rank * shard : (rank + 1) * shard].clone().requires_grad_()
    objective = build_objective(cfg)
    prepared = objective.prepare(StepTokens(mask, adv, old, masked_lp), MICRO_BATCH, None)
    loss, metrics = objective.loss(
        LossInputs(
            local,
            labels,
            mask,
            adv,
            old,
            masked_logits=local_masked if objective.masked_logits_in_update else None,
            masked_log_probs=masked_lp,
            ref_log_probs=ref,
        ),
        LossContext(TEMPERATURE, PROGRESS, GLOBAL if cfg.global_token_mean else None),
        prepared,
    )
    loss.backward()
    grad_masked = local_masked.grad if local_masked.grad is not None else torch.zeros_like(local_masked)
    return float(loss), local.grad, grad_masked, {k: float(v) for k, v in metrics.items()}


def _all_configs(rank: int = 0, world: int = 1):
    return {
        (name, dtype): _ours(AlgorithmConfig(**kw), _inputs(dtype), rank, world)
        for name, kw in CONFIGS.items()
        for dtype in (torch.float64, torch.float32)
    }


def _check(world: int, rank: int, per_config: dict) -> None:
    cols = slice(rank * V // world, (rank + 1) * V // world)
    for (name, dtype), (loss, grad, grad_masked, metrics) in per_config.items():
        cfg = AlgorithmConfig(**CONFIGS[name])
        logits, masked, *rest = [x.double() if x.is_floating_point() else x for x in _inputs(dtype)]
        logits.requires_grad_()
        masked.requires_grad_()
        ref_loss, ref_metrics = _spec_loss(cfg, logits, masked, *rest)
        ref_loss.backward()
        ref_masked = masked.grad if masked.grad is not None else torch.zeros_like(masked)
        tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        where = f"{name} {dtype} TP={world} rank {rank}"
        assert loss == pytest.approx(float(ref_loss), rel=tol["rtol"], abs=tol["atol"]), where
        torch.testing.assert_close(grad.double(), logits.grad[..., cols], **tol, msg=f"grad {where}")
        torch.testing.assert_close(grad_masked.double(), ref_masked[..., cols], **tol, msg=f"masked {where}")
        for key, value in ref_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, where)
        assert metrics["actor/loss"] == loss


def _dp_prepare(scope: str, dp_rank: int, group) -> tuple[torch.Tensor, object]:
    """This DP rank's interleaved half of the batch, prepared with the DP group."""
    logits, masked, labels, mask, old, masked_lp, ref, adv = _inputs()
    rows = torch.arange(dp_rank, B, 2)
    cfg = AlgorithmConfig(**CONFIGS["vppo_recipe"] | {"vppo_tas_scope": scope})
    tokens = StepTokens(mask[rows], adv[rows], old[rows], masked_lp[rows])
    return rows, build_objective(cfg).prepare(tokens, 1, group)


def _distributed(root: str) -> dict:
    """World of 4. TP=2 x DP=2: the objectives on vocab shards, and prepare split over the DP ranks;
    then the micro-steps (TP=1 reference, TP=2 x PP=2)."""
    from megatron.core import parallel_state as ps

    tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    group = ps.get_data_parallel_group()
    out = {
        "tp": (tp_rank, _all_configs(tp_rank, 2)),
        "dp": {scope: _dp_prepare(scope, dp_rank, group) for scope in ("batch", "rank_micro_batch")},
    }
    _relayout(1, 1)
    return out | {name: _run(os.path.join(root, name), cfg) for name, cfg in MICROSTEPS.items()}


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    return run_distributed(_distributed, 4, str(tmp_path_factory.mktemp("objectives")), tp=2)


def test_objectives_single_process():
    _check(1, 0, _all_configs())


def test_objectives_tensor_parallel(distributed):
    for result in distributed:
        rank, per_config = result["tp"]
        _check(2, rank, per_config)


def test_vppo_prepare_is_dp_invariant_in_batch_scope(distributed):
    """The batch split over two DP ranks: the same S_t, mask and alpha as on one process (batch scope);
    the official per-rank scope gives other factors."""
    logits, masked, labels, mask, old, masked_lp, ref, adv = _inputs()
    whole = build_objective(AlgorithmConfig(**CONFIGS["vppo_recipe"])).prepare(
        StepTokens(mask, adv, old, masked_lp), 1, None
    )
    assert float(whole.alpha.mean()) == pytest.approx(1.0)  # mean-preserving over the batch
    for result in distributed:
        rows, prepared = result["dp"]["batch"]
        mine = whole.select(rows)
        assert torch.equal(prepared.dependency, mine.dependency) and torch.equal(prepared.keep, mine.keep)
        torch.testing.assert_close(prepared.alpha, mine.alpha, rtol=1e-12, atol=1e-12)
        rows, per_rank = result["dp"]["rank_micro_batch"]
        assert not torch.allclose(per_rank.alpha, mine.alpha)


@pytest.mark.parametrize("objective", sorted(MICROSTEPS))
def test_tp2_pp2_microstep_equals_tp1(distributed, objective):
    check_microstep([result[objective] for result in distributed])


def test_needs_registry_and_config_errors():
    papo, vppo = (
        build_objective(AlgorithmConfig()),
        build_objective(AlgorithmConfig(**CONFIGS["vppo_recipe"])),
    )
    assert papo.masked_log_probs_needed and not papo.masked_logits_in_update and papo.ref_log_probs_needed
    assert vppo.masked_log_probs_needed and not vppo.masked_logits_in_update and not vppo.ref_log_probs_needed
    assert build_objective(AlgorithmConfig(**CONFIGS["papo_vppo_masked_grad"])).masked_logits_in_update
    with pytest.raises(
        ValueError, match=r"objective must be one of \['papo', 'papo_vppo', 'vppo'\], got 'x'"
    ):
        AlgorithmConfig(objective="x")
    with pytest.raises(ValueError, match=r"vppo has no PAPO terms, but \['gamma', 'eta1', 'eta2'\]"):
        AlgorithmConfig(objective="vppo")  # the papo_g preset
    with pytest.raises(ValueError, match="vppo_top_k and vppo_beta_min in"):
        AlgorithmConfig(name="dapo", objective="vppo", vppo_top_k=0.0)
    logits, masked, labels, mask, old, masked_lp, ref, adv = _inputs()
    with pytest.raises(ValueError, match="needs masked_log_probs"):
        vppo.prepare(StepTokens(mask, adv, old), MICRO_BATCH, None)
    inputs = LossInputs(logits, labels, mask, adv, old, masked_log_probs=masked_lp)
    with pytest.raises(ValueError, match=r"needs its prepare\(\) rows"):
        vppo.loss(inputs, LossContext(), None)
