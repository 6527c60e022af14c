"""``rollout.max_staleness`` 1 with the real trainer (tiny model, embedded engine): step ``k`` trains on
samples generated with the weights of version ``k - 2`` (the engine's weights at generation are those
synced after step ``k - 2``, and the samples' version tags say so), the staleness, mismatch and
importance-weight figures are logged, a run stopped and resumed reads the prompts in the same order as one
that was not, and the collectives of the producer thread hold with data parallelism and DAPO's refills.

The in-process runs share one process, so the run-directory lock (held until the process exits) is off.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from main_job import CONFIG, job_overrides, train
from multiprocess import run_distributed
from test_trainer_steps import PARITY_REWARD

STEPS = 4
STALENESS_KEYS = ("rollout/staleness", "rollout/weight_version_min", "rollout/weight_version_max")


def _digest(module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _trainer(model: str, out: Path, *overrides: str):
    """A ``Trainer`` of the main job's config, ``STEPS`` steps, built in this process."""
    from megatron.core import parallel_state as ps

    from megatron_papo import loop
    from megatron_papo.config import load_train_config
    from megatron_papo.trainer import Trainer

    class NoLock:
        def __init__(self, dirs: list[str]) -> None:
            pass

        def acquire(self) -> None:
            pass

    loop.RunLock = NoLock
    ps.destroy_model_parallel()  # the trainer brings the layout up itself
    cfg = load_train_config(CONFIG, job_overrides(out, model, f"trainer.steps={STEPS}", *overrides))
    return Trainer(cfg)


def _recorded_run(model: str, out: Path, *overrides: str) -> dict:
    """One run: per step its prompts' uids and metrics; the engine's weights (digest) when each step's
    batch started and after each synced version."""
    trainer = _trainer(model, out, *overrides)
    engine = trainer.policy.engine
    steps, generated, synced = {}, {}, {trainer.step: _digest(engine.model)}
    train_step, produce, sync = trainer.train_step, trainer._produce, trainer.policy.sync_rollout_weights

    def recorded_step():
        outcome = train_step()
        steps[trainer.step] = {"uids": [p.uid for p in outcome.prompts], "metrics": outcome.metrics}
        return outcome

    def recorded_produce(step, groups):
        generated[step] = _digest(engine.model)
        return produce(step, groups)

    def recorded_sync(version=0):
        sync(version)
        synced[version] = _digest(engine.model)

    trainer.train_step, trainer._produce = recorded_step, recorded_produce
    trainer.policy.sync_rollout_weights = recorded_sync
    trainer.run()
    return {"steps": steps, "generated": generated, "synced": synced}


def _runs(model: str, root: str) -> dict:
    root_path = Path(root)
    ahead = "rollout.max_staleness=1"
    return {
        "sync": _recorded_run(model, root_path / "sync"),
        "ahead": _recorded_run(model, root_path / "ahead", ahead),
        "stopped": _recorded_run(model, root_path / "resumed", ahead, "trainer.exit_after_steps=2"),
        "resumed": _recorded_run(model, root_path / "resumed", ahead, "checkpoint.resume=true"),
    }


def test_samples_one_step_stale_resume_in_the_same_data_order(tmp_path, tiny_model):
    (runs,) = run_distributed(_runs, 1, tiny_model, str(tmp_path))
    ahead, sync = runs["ahead"], runs["sync"]
    assert sorted(ahead["steps"]) == list(range(1, STEPS + 1))
    # every version differs from the one before: the engine's weights identify the version
    assert len(set(ahead["synced"].values())) == STEPS + 1
    for step, row in ahead["steps"].items():
        version = max(step - 2, 0)
        # the engine generated step k's batch with the weights synced after step k - 2 ...
        assert ahead["generated"][step] == ahead["synced"][version], step
        # ... and the samples' tags say so
        metrics = row["metrics"]
        assert metrics["rollout/weight_version_min"] == metrics["rollout/weight_version_max"] == version
        assert metrics["rollout/staleness"] == (step > 1)
        for key in ("rollout/logprob_mismatch", "rollout/is_weight_mean", "perf/trainer_idle_frac"):
            assert key in metrics, key
    # the synchronous loop generates with the latest weights and logs none of it
    for step, row in sync["steps"].items():
        assert sync["generated"].get(step) is None
        assert not any(k in row["metrics"] for k in (*STALENESS_KEYS, "rollout/is_weight_mean"))
    # the same prompts and seeds: step 1 (version 0 in both) samples the same responses
    for key in ("reward/mean", "reward/accuracy", "response/length"):
        assert ahead["steps"][1]["metrics"][key] == sync["steps"][1]["metrics"][key], key
    # data order: the same prompts step by step, ahead or not, stopped and resumed or not
    order = [ahead["steps"][k]["uids"] for k in range(1, STEPS + 1)]
    assert order == [sync["steps"][k]["uids"] for k in range(1, STEPS + 1)]
    assert len({u for uids in order for u in uids}) == len(order) * len(order[0])  # 8 prompts, each once
    stopped, resumed = runs["stopped"]["steps"], runs["resumed"]["steps"]
    assert sorted(stopped) == [1, 2] and sorted(resumed) == [3, 4]
    assert [stopped[1]["uids"], stopped[2]["uids"], resumed[3]["uids"], resumed[4]["uids"]] == order
    # the resumed run's first batch is generated with the checkpoint's weights (version 2, staleness 0)
    assert resumed[3]["metrics"]["rollout/weight_version_max"] == 2
    assert resumed[3]["metrics"]["rollout/staleness"] == 0
    assert resumed[4]["metrics"]["rollout/staleness"] == 1


def test_data_parallel_dapo_refills_on_the_producer_thread(tmp_path, tiny_model):
    reward = tmp_path / "parity.py"
    reward.write_text(PARITY_REWARD)
    rows, _ = train(
        tmp_path, "dapo", tiny_model, 2,
        "rollout.max_staleness=1", "algorithm.name=dapo", f"reward.function={reward}:parity",
        "algorithm.max_tries=8", "logging.save_rollouts=true",
    )  # fmt: skip
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["rollout/staleness"] for r in rows] == [0, 1, 1]
    assert [r["rollout/weight_version_max"] for r in rows] == [0, 0, 1]
    assert all(r["rollout/used_groups"] == 2 and r["rollout/tries"] >= 1 for r in rows)
    # logging.save_rollouts: each step's trained samples, both DP ranks', with the versions that made them
    for row in rows:
        samples = [json.loads(x) for x in (tmp_path / "dapo/rollouts" / f"step{row['step']}.jsonl").open()]
        assert len(samples) == 2 * 2 and len({s["uid"] for s in samples}) == 2, samples  # 2 groups of n=2
        assert {s["weight_version"] for s in samples} == {row["rollout/weight_version_max"]}
        assert all(isinstance(s["response"], str) and s["step"] == row["step"] for s in samples)


def test_tensor_parallel_generation_on_the_producer_thread(tmp_path, tiny_model):
    rows, _ = train(
        tmp_path, "tp2", tiny_model, 2, "parallel.tensor_model_parallel_size=2", "rollout.max_staleness=1"
    )
    assert [r["rollout/weight_version_min"] for r in rows] == [0, 0, 1]
    assert all(0 <= r["perf/generator_idle_frac"] <= 1 for r in rows)
