"""Early, resumable stops: SIGTERM / SIGUSR1 on any rank or ``trainer.exit_after_minutes`` stop every rank at
the same step boundary with a checkpoint and exit status 75; the relaunch (``checkpoint.resume=auto``)
continues bit for bit. The real runs: the main job at TP=2 (2 processes launched directly, as ``srun``
does) with SIGTERM sent to rank 1 alone, then relaunched under torchrun; and ``tiny_cpu.sbatch`` on the
real single-node SLURM, signalled as before a time limit, requeueing itself. Both compare with the
uninterrupted ``tp2_run`` (conftest.py)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch.distributed as dist
from main_job import CONFIG, ROOT, job_overrides, metrics_rows, train, untimed
from multiprocess import free_port

from megatron_papo.training.preemption import (
    EXIT_SIGNALS,
    EXIT_STOPPED_EARLY,
    EarlyExit,
    ignore_exit_signals,
)
from megatron_papo.training.run_dir import LOCK_FILE, weight_sync_dir

TP2 = "parallel.tensor_model_parallel_size=2"
SLURM_SCRIPTS = ["tiny_cpu", "qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_32b", "qwen2_5_vl_72b"]


@pytest.fixture
def world_of_one():
    """An in-process gloo group of one rank; the process's signal handlers restored afterwards."""
    handlers = {s: signal.getsignal(s) for s in EXIT_SIGNALS}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", EXIT_SIGNALS)
def test_a_signal_stops_at_the_next_boundary(world_of_one, sig):
    stop = EarlyExit(0)
    assert stop.reason() is None
    signal.raise_signal(sig)  # recorded, not fatal
    assert stop.reason() == f"{sig.name} received"


def test_the_time_budget_stops_the_run(world_of_one):
    now = [100.0]
    stop = EarlyExit(0.5, clock=lambda: now[0])
    now[0] += 29
    assert stop.reason() is None
    now[0] += 1
    assert stop.reason() == "trainer.exit_after_minutes=0.5 reached"


def test_data_loader_workers_outlive_the_signals():
    pid = os.fork()
    if pid == 0:  # a worker: the job-wide signal must not kill it
        ignore_exit_signals()
        for sig in EXIT_SIGNALS:
            os.kill(os.getpid(), sig)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0


def _wait_for_step(out, step, running, timeout=600):
    """Until ``out/metrics.jsonl`` has a row for ``step``; ``running()`` must hold meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(r["step"] >= step for r in metrics_rows(out)):
                return
        except ValueError:  # a row being written
            pass
        assert running(), "the run ended before the step"
        assert time.monotonic() < deadline, f"no step {step} after {timeout}s"
        time.sleep(0.2)


def _launch_ranks(out, model, logs, world, *overrides):
    """The main job's ranks as separate processes (``RANK`` / ``WORLD_SIZE``, no launcher in between)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, WORLD_SIZE=str(world))
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "megatron_papo.cli", "train", "--config", CONFIG]
    cmd += job_overrides(out, model, *overrides)
    return [
        subprocess.Popen(
            cmd,
            env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=open(logs / f"rank{r}.txt", "w"),  # noqa: SIM115 (the child holds it)
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]


@pytest.fixture(scope="module")
def signalled(tmp_path_factory, tiny_model):
    """The main job at TP=2 with SIGTERM sent to rank 1 alone after step 1; then, with a live process
    holding its checkpoint directory's lock, a relaunch (refused); then, that process gone and a crashed
    launch's leftovers planted (a weight sync, a metrics row past the checkpoint), the relaunch
    (``checkpoint.resume=auto``, torchrun)."""
    tmp = tmp_path_factory.mktemp("signalled")
    out = tmp / "run"
    procs = _launch_ranks(out, tiny_model, tmp, 2, TP2)
    try:
        _wait_for_step(out, 1, lambda: all(p.poll() is None for p in procs))
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    logs = [(tmp / f"rank{r}.txt").read_text() for r in range(2)]
    stopped_rows = metrics_rows(out)
    latest = (out / "ckpt" / "latest").read_text()

    holder = subprocess.Popen(["sleep", "600"])
    (out / "ckpt" / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
    busy = train(tmp, "run", tiny_model, 2, TP2, "checkpoint.resume=auto", check=False)[1]
    holder.kill()
    holder.wait()

    os.makedirs(os.path.join(weight_sync_dir(str(out)), "v5"))
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": stopped_rows[-1]["step"] + 1, "actor/loss": 0.0}) + "\n")
    rows, resumed = train(tmp, "run", tiny_model, 2, TP2, "checkpoint.resume=auto")
    return SimpleNamespace(
        out=out,
        codes=codes,
        logs=logs,
        stopped_rows=stopped_rows,
        latest=latest,
        busy=busy,
        rows=rows,
        resumed=resumed,
    )


def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint(signalled):
    assert signalled.codes == [EXIT_STOPPED_EARLY] * 2, signalled.logs
    step = signalled.stopped_rows[-1]["step"]
    assert step < 3 and signalled.latest == str(step)  # saved at the step where it stopped
    assert f"step {step}: SIGTERM received; saving and stopping" in signalled.logs[0]  # rank 0 was told
    for log in signalled.logs:
        assert f"stopped at step {step} (SIGTERM received) after saving its checkpoint" in log
        assert "exit status 75" in log


def test_a_second_run_on_the_directories_is_refused(signalled):
    output = signalled.busy.stdout + signalled.busy.stderr
    assert signalled.busy.returncode != 0
    assert f"{signalled.out / 'ckpt'} is in use by another run" in output


def test_the_relaunch_continues_bitwise_and_clears_the_crashed_launch(tp2_run, signalled):
    step, out, resumed = signalled.stopped_rows[-1]["step"], signalled.out, signalled.resumed
    assert f"resumed from step {step}" in resumed.stdout
    # one row per step (the planted one past the checkpoint dropped), each the uninterrupted run's
    assert [r["step"] for r in signalled.rows] == [1, 2, 3]
    assert [untimed(r) for r in signalled.rows] == [untimed(r) for r in tp2_run]
    assert "dropped 1 metrics rows" in resumed.stdout
    assert "taking over the stale lock" in resumed.stderr
    assert "removed the vLLM weight syncs of an earlier launch" in resumed.stdout
    assert not os.path.exists(weight_sync_dir(str(out)))
    assert sorted(os.listdir(out / "launches")) == ["001.yaml", "002.yaml"]
    assert "fresh start" in (out / "launches" / "001.yaml").read_text()
    assert f"resumed from step {step}" in (out / "config.yaml").read_text()
    assert not (out / LOCK_FILE).exists() and not (out / "ckpt" / LOCK_FILE).exists()  # released


@pytest.mark.parametrize("name", SLURM_SCRIPTS)
def test_sbatch_scripts_save_before_the_time_limit_and_requeue(name):
    text = open(os.path.join(ROOT, "examples", "slurm", f"{name}.sbatch"), encoding="utf-8").read()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#SBATCH"))
    assert re.search(r"--signal=USR1@\d+\b", header) and "--requeue" in header
    assert "--open-mode=append" in header  # a requeued job's log continues the first launch's
    body = (
        text
        if name == "tiny_cpu"
        else open(os.path.join(ROOT, "examples", "slurm", "papo_vllm_job.sh")).read()
    )
    assert "source examples/slurm/requeue.sh" in body and "run_or_requeue srun" in body
    assert "checkpoint.resume=auto" in body and "checkpoint.save_interval=" in body
    run_dir = [line for line in body.splitlines() if "output_dir=" in line or "checkpoint.dir=" in line]
    assert run_dir and not any("SLURM_JOB_ID" in line for line in run_dir)  # the same after a requeue


@pytest.mark.parametrize("status, requeued", [(EXIT_STOPPED_EARLY, True), (0, False), (3, False)])
def test_requeue_only_after_an_early_stop(tmp_path, status, requeued):
    (tmp_path / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/called\n')
    (tmp_path / "scontrol").chmod(0o755)
    script = "set -euo pipefail; source examples/slurm/requeue.sh; "
    script += f"run_or_requeue sh -c 'exit {status}'; echo after"
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_ID="42")
    run = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == (0 if requeued else status)
    assert ((tmp_path / "called").exists() and (tmp_path / "called").read_text()) == (
        "requeue 42\n" if requeued else False
    )
    assert ("after" in run.stdout) == (status == 0)


def _job(slurm, job):
    """``scontrol show job``'s fields of ``job``."""
    show = subprocess.run(["scontrol", "-o", "show", "job", job], env=slurm, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", show.stdout))


# the states a job ends in (squeue's "job state codes"); the relaunch's COMPLETING or RUNNING are not
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def _wait_for_job(slurm, job, done, timeout=600):
    deadline = time.monotonic() + timeout
    while not done(info := _job(slurm, job)):
        assert time.monotonic() < deadline, f"job {job} stuck: {info}"
        time.sleep(0.5)
    return info


@pytest.mark.slurm
def test_a_signalled_slurm_job_requeues_and_continues_bitwise(slurm, tmp_path, tiny_model, tp2_run):
    """``tiny_cpu.sbatch`` as ``tp2_run``'s job (2 tasks, TP=2), signalled after step 1 as SLURM does
    before a time limit (``scancel --signal=USR1``: every task of its steps): it saves, exits 75 and
    requeues itself; the relaunch continues in the same directory, bitwise as if uninterrupted."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    env = slurm | {"PAPO_ENTRY": f"{sys.executable} -m megatron_papo.cli"}
    cmd = ["sbatch", "--parsable", "--ntasks=2", "--time=15", f"--output={log}", f"--chdir={ROOT}"]
    cmd += ["examples/slurm/tiny_cpu.sbatch", *job_overrides(out, tiny_model, TP2)]
    cmd += ["parallel.pipeline_model_parallel_size=1"]
    job = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip()
    try:
        _wait_for_step(out, 1, lambda: _job(slurm, job).get("JobState") in ("PENDING", "RUNNING"))
        subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
        # requeued, it starts again once its old credential has expired (slurm_local.sh: 15 s; starting it
        # earlier with `scontrol update StartTime=now` races the revocation: "Job credential revoked")
        _wait_for_job(slurm, job, lambda i: i.get("JobState") == "PENDING" and i.get("Restarts") == "1")
        info = _wait_for_job(slurm, job, lambda i: i.get("JobState") in ENDED)
    finally:
        subprocess.run(["scancel", job], env=slurm)
    output = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", output[-4000:]
    assert "Exited with exit code 75" in output and f"requeueing job {job}" in output
    step = int((out / "launches" / "002.yaml").read_text().split("resumed from step ")[1].split()[0])
    assert step in (1, 2) and "USR1 received" in output
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [untimed(r) for r in rows] == [untimed(r) for r in tp2_run]
