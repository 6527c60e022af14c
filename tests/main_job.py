"""The main job through the real CLI under torchrun, for the end-to-end tests (tiny model: the
``tiny_model`` fixture in conftest.py)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")


def job_overrides(out, model, *overrides):
    """The main job's config overrides (on ``CONFIG``) at tiny sizes into ``out``, plus ``overrides``."""
    return [
        f"model.hf_path={model}",
        f"trainer.output_dir={out}",
        f"checkpoint.dir={out}/ckpt",
        "trainer.steps=3",
        "rollout.n=2",
        "parallel.tensor_model_parallel_size=1",
        "rollout.max_new_tokens=8",
        "trainer.rollout_batch_size=2",
        "trainer.update_batch_size=2",
        "trainer.micro_batch_size=2",
        "data.synthetic.num_train=8",
        "data.synthetic.num_test=2",
        "data.synthetic.seed=0",
        "checkpoint.save_interval=0",
        "logging.tensorboard=false",
        *overrides,
    ]


# what differs between runs that compute the same (each step's timings)
TIMINGS = ("perf/", "rollout/time_s", "rollout/tokens_per_s")


def untimed(row):
    """A metrics row without its timings: what an exact resume must reproduce bit for bit."""
    return {k: v for k, v in row.items() if not k.startswith(TIMINGS)}


def metrics_rows(out):
    """The rows of ``out/metrics.jsonl`` (none when it does not exist)."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train(tmp_path, name, model, procs=1, *overrides, check=True):
    """``megatron-papo train`` on ``procs`` processes, tiny sizes plus ``overrides``, into ``tmp_path/name``:
    its ``metrics.jsonl`` rows and the finished process (``check``: a failure raises with its output)."""
    out = tmp_path / name
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={procs}",
        "--standalone",
        "-m",
        "megatron_papo.cli",
        "train",
        "--config",
        CONFIG,
        *job_overrides(out, model, *overrides),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return metrics_rows(out), result
