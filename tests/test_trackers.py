"""W&B and MLflow, offline: a real run on 2 processes (TP=2) stopped after step 2 and resumed for step 3,
its tracker runs read back with W&B's and MLflow's own readers; the console around it."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from megatron_papo.training.trackers import MlflowConfig, WandbConfig


@pytest.fixture(scope="module")
def tracked(stopped_and_resumed):
    """(output dir, metrics.jsonl rows, first launch, resumed launch) of the stopped-and-resumed TP=2 run
    with both trackers on (conftest.py; ``tests/test_train_e2e.py`` checks that the resume is exact)."""
    out, rows, first, _, resumed = stopped_and_resumed
    assert [r["step"] for r in rows] == [1, 2, 3]
    return out, rows, first, resumed


def _same(logged: float, row: float) -> bool:
    return logged == pytest.approx(row, rel=1e-6, nan_ok=True)


def wandb_records(run_dir: str) -> list[dict]:
    """An offline run's records, as W&B's own transaction-log reader prints them."""
    done = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", run_dir],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_wandb_offline_run_holds_every_step_once_and_resume_appends(tracked):
    out, rows, _, _ = tracked
    run_dirs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    assert len(run_dirs) == 2  # one per launch: only rank 0 writes
    runs, history = [], {}
    for run_dir in run_dirs:
        records = wandb_records(run_dir)
        (run,) = [r["run"] for r in records if r["type"] == "run"]
        runs.append(run)
        for record in records:
            if record["type"] == "history":
                step = record["history"]["step"]["num"]
                assert step not in history
                history[step] = (run_dir, record["history"]["item"])
    first, resumed = runs
    assert resumed["run_id"] == first["run_id"] and resumed.get("resume") and not first.get("resume")
    assert json.loads((out / "trackers.json").read_text())["wandb"] == first["run_id"]
    assert (first["project"], first["display_name"], first["tags"]) == ("papo-test", "run", ["tiny", "ci"])
    assert first["config"]["update"]["algorithm"]["name"] == "papo_g"
    assert sorted(history) == [1, 2, 3]
    for row in rows:
        item = history[row["step"]][1]
        assert all(_same(item[k], v) for k, v in row.items() if k != "step"), row["step"]
        assert ("inputs/original.count" in item) == (row["step"] == 2)  # image_interval=2
    run_dir, item = history[2]
    original, masked = (
        [np.asarray(Image.open(os.path.join(run_dir, "files", f))) for f in item[f"inputs/{kind}.filenames"]]
        for kind in ("original", "masked")
    )
    assert len(original) == len(masked) == 1 and original[0].shape == masked[0].shape
    assert (masked[0] == 0).all(axis=-1).sum() > (original[0] == 0).all(axis=-1).sum()  # black squares


def test_mlflow_file_store_holds_every_step_once_in_one_run(tracked, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    out, rows, _, _ = tracked
    client = MlflowClient(f"file:{out / 'mlruns'}")
    experiment = client.get_experiment_by_name("papo-test")
    (run,) = client.search_runs([experiment.experiment_id])  # resume appended to it
    run_id = run.info.run_id
    assert json.loads((out / "trackers.json").read_text())["mlflow"] == run_id
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["algorithm.name"] == "papo_g" and run.data.params["rollout.n"] == "2"
    for key in {k for row in rows for k in row} - {"step"}:
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        expected = [(row["step"], row[key]) for row in rows if key in row]
        assert [s for s, _ in logged] == [s for s, _ in expected], key
        assert all(_same(a, b) for (_, a), (_, b) in zip(logged, expected, strict=True)), key


def test_console_says_what_runs_where_and_library_noise_goes_to_the_log(tracked):
    out, _, first, resumed = tracked
    lines = first.stdout.splitlines()
    assert lines[0] == "megatron-papo: train papo_g (objective papo), 3 steps of 2 prompts x 2 responses"
    assert "2 processes (torchrun; cpu, gloo): TP 2 x PP 1 x DP 1" in lines[2]
    assert all(where in first.stdout for where in ("synthetic task", "embedded", f"library logs {out}/logs"))
    ids = json.loads((out / "trackers.json").read_text())
    assert f"W&B offline run {ids['wandb']}" in first.stdout and f"MLflow run {ids['mlflow']}" in first.stdout
    steps = [line for line in first.stdout.splitlines() + resumed.stdout.splitlines() if "] step " in line]
    assert len(steps) == 3 and all("reward=" in line and " mean=" not in line for line in steps)
    for launch in (first, resumed):
        assert "megatron.core" not in launch.stdout + launch.stderr
    assert "Setting up optimizer" in (out / "logs" / "rank0.log").read_text()
    assert (out / "logs" / "rank1.log").exists()


@pytest.mark.parametrize("section, module", [(WandbConfig, "wandb"), (MlflowConfig, "mlflow")])
def test_a_tracker_without_its_library_is_a_config_error(monkeypatch, section, module):
    monkeypatch.setitem(sys.modules, module, None)  # not importable
    extra = r"pip install 'megatron-papo\[trackers\]'"
    with pytest.raises(ValueError, match=rf"needs the {module} package: {extra}"):
        section(enabled=True)
