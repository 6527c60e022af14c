"""The trainers' first step with ``trainer.pack_sequences`` true and false: the same metrics.

The real ``Trainer`` (policy, embedded rollout engine, synthetic data: one image per prompt, responses
of different lengths) and ``SFTTrainer`` in one process, each one's step 1 run twice from the same
start; every metric but the timings must agree within 1e-5 (rollouts are seeded per prompt, so both RL
steps train on the same sequences).
"""

from __future__ import annotations

from multiprocess import run_distributed
from test_trainer_steps import _config, _fresh_layout

from megatron_papo.models.tiny import make_tiny_qwen25vl

TIMINGS = ("perf/", "rollout/time_s", "rollout/tokens_per_s")


def _step_metrics(model: str, root: str) -> dict[tuple[str, bool], dict[str, float]]:
    from megatron_papo.sft import SFTTrainer
    from megatron_papo.trainer import Trainer

    out = {}
    for kind, loop in (("rl", Trainer), ("sft", SFTTrainer)):
        for packed in (False, True):
            _fresh_layout()
            cfg = _config(model, f"{root}/{kind}{packed}", f"trainer.pack_sequences={str(packed).lower()}")
            trainer = loop(cfg)
            trainer.step = 1
            out[kind, packed] = trainer.train_step().metrics
    return out


def test_trainer_step_metrics_do_not_depend_on_packing(tmp_path):
    model = make_tiny_qwen25vl(str(tmp_path / "tiny"))
    (metrics,) = run_distributed(_step_metrics, 1, model, str(tmp_path / "runs"))
    for kind in ("rl", "sft"):
        padded, packed = metrics[kind, False], metrics[kind, True]
        assert padded.keys() == packed.keys() and "actor/loss" in padded and "actor/grad_norm" in padded
        compared = [k for k in padded if not k.startswith(TIMINGS)]
        diffs = {k: abs(padded[k] - packed[k]) for k in compared}
        assert all(d <= 1e-5 * max(1.0, abs(padded[k])) for k, d in diffs.items()), (kind, diffs)
        print(kind, "max |metric| diff", max(diffs.values()), "over", len(compared), "metrics")


def _balanced_step(model: str, root: str) -> dict[int, dict[str, float]]:
    """Step 1 of the real ``Trainer`` at DP=2, packed, with fixed micro-batches and with token budgets
    (which first even out the DP ranks' tokens by exchanging groups): max_tokens -> metrics."""
    from megatron_papo.trainer import Trainer

    out = {}
    for max_tokens in (0, 160):
        _fresh_layout()
        cfg = _config(
            model,
            f"{root}/budget{max_tokens}",
            "trainer.pack_sequences=true",
            f"trainer.max_tokens_per_micro_batch={max_tokens}",
            "algorithm.global_token_mean=true",
            "trainer.rollout_batch_size=4",
            "trainer.update_batch_size=4",
            "rollout.max_new_tokens=24",
        )
        trainer = Trainer(cfg)
        trainer.step = 1
        out[max_tokens] = trainer.train_step().metrics
    return out


def test_dp_token_balancing_keeps_the_global_token_mean_step(tmp_path):
    """The same step with groups moved between DP ranks: the loss and the reduced gradient's norm agree
    (the global token-mean does not depend on where a token sits)."""
    model = make_tiny_qwen25vl(str(tmp_path / "tiny"))
    fixed, balanced = run_distributed(_balanced_step, 2, model, str(tmp_path / "runs"))[0].values()
    assert "dp/token_imbalance_after" in balanced and "dp/token_imbalance_after" not in fixed
    assert balanced["dp/token_imbalance_after"] <= balanced["dp/token_imbalance_before"]
    for key in ("actor/loss", "actor/grad_norm", "reward/mean", "response/length"):
        assert abs(fixed[key] - balanced[key]) <= 1e-5 * max(1.0, abs(fixed[key])), (
            key,
            fixed[key],
            balanced[key],
        )
