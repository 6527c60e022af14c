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
