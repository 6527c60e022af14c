"""The trainer's first step with ``trainer.pack_sequences`` true and false: the same metrics.

The real ``Trainer`` (policy, embedded rollout engine, synthetic data: one image per prompt, responses
of different lengths) in one process, its step 1 run twice from the same start; every metric but the
timings must agree within 1e-5 (rollouts are seeded per prompt, so both steps train on the same
sequences).
"""

from __future__ import annotations

from multiprocess import run_distributed
from test_trainer_steps import _config, _fresh_layout

from megatron_papo.models.tiny import make_tiny_qwen25vl

TIMINGS = ("perf/", "rollout/time_s", "rollout/tokens_per_s")


def _step_metrics(model: str, root: str) -> dict[bool, dict[str, float]]:
    from megatron_papo.trainer import Trainer

    out = {}
    for packed in (False, True):
        _fresh_layout()
        cfg = _config(model, f"{root}/{packed}", f"trainer.pack_sequences={str(packed).lower()}")
        trainer = Trainer(cfg)
        trainer.step = 1
        out[packed] = trainer.train_step().metrics
    return out


def test_trainer_step_metrics_do_not_depend_on_packing(tmp_path):
    model = make_tiny_qwen25vl(str(tmp_path / "tiny"))
    (metrics,) = run_distributed(_step_metrics, 1, model, str(tmp_path / "runs"))
    padded, packed = metrics[False], metrics[True]
    assert padded.keys() == packed.keys() and "actor/loss" in padded and "actor/grad_norm" in padded
    compared = [k for k in padded if not k.startswith(TIMINGS)]
    diffs = {k: abs(padded[k] - packed[k]) for k in compared}
    assert all(d <= 1e-5 * max(1.0, abs(padded[k])) for k, d in diffs.items()), diffs
    print("max |metric| diff", max(diffs.values()), "over", len(compared), "metrics")
