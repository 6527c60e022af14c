"""Import the package from this checkout, whatever ``pip install -e`` last pointed at; shared fixtures."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SLURM_DIR = "/tmp/slurm-local"
SLURM_ENV = {**os.environ, "SLURM_DIR": SLURM_DIR, "SLURM_CONF": f"{SLURM_DIR}/slurm.conf"}
NOT_ABLE = 3  # slurm_local.sh: the packages cannot be installed


@pytest.fixture(scope="session")
def slurm():
    """A single-node SLURM (``tools/slurm_local.sh up``) for the session: the client environment."""
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


@pytest.fixture(scope="session", autouse=True)
def forkserver(tmp_path_factory) -> None:
    """The fork server the multi-process tests fork their ranks from imports while the first tests run."""
    from multiprocess import start_forkserver

    start_forkserver(str(tmp_path_factory.mktemp("forkserver") / "log.txt"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random tiny Qwen2.5-VL HF directory (the main job's model in the end-to-end tests)."""
    from megatron_papo.models.tiny import make_tiny_qwen25vl

    return make_tiny_qwen25vl(str(tmp_path_factory.mktemp("model") / "tiny"))


@pytest.fixture(scope="session")
def tp2_run(tmp_path_factory, tiny_model):
    """The main job at TP=2 (2 processes), 3 steps uninterrupted: its ``metrics.jsonl`` rows."""
    from main_job import train

    return train(
        tmp_path_factory.mktemp("tp2"), "tp2", tiny_model, 2, "parallel.tensor_model_parallel_size=2"
    )[0]


# both trackers, offline (MLflow: the default file store in the output directory)
TRACKERS = (
    "logging.wandb.enabled=true",
    "logging.wandb.mode=offline",
    "logging.wandb.project=papo-test",
    "logging.wandb.tags=[tiny, ci]",
    "logging.wandb.image_interval=2",
    "logging.mlflow.enabled=true",
    "logging.mlflow.experiment=papo-test",
)


@pytest.fixture(scope="session")
def stopped_and_resumed(tmp_path_factory, tiny_model):
    """``tp2_run``'s job with both trackers on, stopped after step 2, started again without ``--resume``
    (refused), then resumed: (output dir, metrics rows, first launch, refused launch, resumed launch)."""
    from main_job import train

    tmp, tp2 = tmp_path_factory.mktemp("stopped"), "parallel.tensor_model_parallel_size=2"
    first = train(tmp, "run", tiny_model, 2, tp2, *TRACKERS, "trainer.exit_after_steps=2")[1]
    refused = train(tmp, "run", tiny_model, 2, tp2, *TRACKERS, check=False)[1]
    rows, resumed = train(tmp, "run", tiny_model, 2, tp2, *TRACKERS, "--resume")
    return tmp / "run", rows, first, refused, resumed
