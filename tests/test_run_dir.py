"""A run's directories survive crashes and concurrent starts: durable ``latest``, its fallback, pruning that
spares the newest checkpoints, the resume modes, the run lock, metrics rows and launch configs kept per
launch, weight syncs of a crashed launch removed (unit level, in-process; the loop's use of them is
``tests/test_preemption.py``'s)."""

import json
import logging
import os
import socket
import subprocess

import pytest

from megatron_papo.config import load_train_config
from megatron_papo.training import durable
from megatron_papo.training.checkpointing import CheckpointConfig, latest_step, publish, resume_step
from megatron_papo.training.metrics import MetricsLogger
from megatron_papo.training.run_dir import (
    LOCK_FILE,
    RunDirBusy,
    RunLock,
    clean_weight_syncs,
    record_launch,
    weight_sync_dir,
)


def _iters(root, *steps):
    for step in steps:
        (root / f"iter_{step:07d}").mkdir(parents=True)


def _listing(root):
    return sorted(os.listdir(root))


def test_publish_fsyncs_the_checkpoint_rename_and_latest(tmp_path, monkeypatch):
    flushed = []
    real = os.fsync
    monkeypatch.setattr(
        durable.os, "fsync", lambda fd: (flushed.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))
    )
    (tmp_path / "iter_0000003.tmp").mkdir()
    publish(str(tmp_path), 3, keep_last=2)
    assert _listing(tmp_path) == ["iter_0000003", "latest"] and (tmp_path / "latest").read_text() == "3"
    root = str(tmp_path)
    # the directory after the checkpoint's rename, latest's data before its rename, the directory after
    assert flushed == [root, os.path.join(root, "latest.tmp"), root]


def test_fsync_tree_splits_the_files_over_the_ranks(tmp_path, monkeypatch):
    for name in ("a", "b", "c", "sub/d", "sub/e"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    flushed = {}
    for rank in range(2):
        monkeypatch.setattr(durable, "fsync_path", lambda p, r=rank: flushed.setdefault(r, []).append(p))
        durable.fsync_tree(str(tmp_path), rank, 2)
    files = [str(tmp_path / n) for n in ("a", "b", "c", "sub/d", "sub/e")]
    assert sorted(flushed[0] + flushed[1]) == sorted(files + [str(tmp_path), str(tmp_path / "sub")])
    assert not set(flushed[0]) & set(flushed[1]) and set(files) - set(flushed[0])  # shared, not repeated


@pytest.mark.parametrize("latest", ["", "garbage", "7", None])
def test_bad_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog, latest):
    _iters(tmp_path, 2, 4)
    (tmp_path / "iter_0000006.tmp").mkdir()  # a save that crashed before its rename: incomplete
    if latest is not None:
        (tmp_path / "latest").write_text(latest)
    with caplog.at_level(logging.WARNING):
        assert latest_step(str(tmp_path)) == 4
    assert "using the newest complete checkpoint" in caplog.text and "iter_0000004" in caplog.text


def test_bad_latest_without_a_checkpoint_is_a_clear_error(tmp_path):
    assert latest_step(str(tmp_path)) is None  # nothing saved: a fresh start
    (tmp_path / "iter_0000006.tmp").mkdir()
    (tmp_path / "latest").write_text("")
    with pytest.raises(RuntimeError, match="holds no complete checkpoint"):
        latest_step(str(tmp_path))


@pytest.mark.parametrize("keep_last, kept", [(1, [5, 6, 10]), (2, [4, 5, 6, 10]), (5, [2, 4, 5, 6, 10])])
def test_pruning_spares_the_saved_checkpoint_and_newer_ones(tmp_path, keep_last, kept):
    _iters(tmp_path, 2, 4, 6, 10)  # 6 and 10: orphans of a crashed run that got further than this one
    (tmp_path / "iter_0000005.tmp").mkdir()
    publish(str(tmp_path), 5, keep_last)
    assert _listing(tmp_path) == [f"iter_{s:07d}" for s in kept] + ["latest"]
    assert latest_step(str(tmp_path)) == 5


def test_resume_modes(tmp_path):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(FileNotFoundError, match=f"{ckpt} holds no checkpoint to resume from"):
        resume_step(CheckpointConfig(dir=str(ckpt), resume=True))
    assert resume_step(CheckpointConfig(dir=str(ckpt), resume="auto")) is None
    _iters(ckpt, 3)
    (ckpt / "latest").write_text("3")
    assert resume_step(CheckpointConfig(dir=str(ckpt), resume="auto")) == 3
    assert resume_step(CheckpointConfig(dir=str(ckpt), resume=True)) == 3
    assert resume_step(CheckpointConfig(dir=str(ckpt), resume=False)) is None
    assert load_train_config(None, ["checkpoint.resume=auto"]).checkpoint.resume == "auto"
    with pytest.raises(ValueError, match="checkpoint.resume"):
        load_train_config(None, ["checkpoint.resume=sometimes"])


def _write_lock(directory, **holder):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": 0} | holder))


def test_a_live_run_holds_its_directories(tmp_path, monkeypatch):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    other = subprocess.Popen(["sleep", "60"])  # the holder of a lock: a live process on this host
    try:
        _write_lock(ckpt, pid=other.pid, started="earlier")
        with pytest.raises(RunDirBusy, match=f"{ckpt} is in use by another run: .* pid {other.pid}"):
            RunLock([str(out), str(ckpt)]).acquire()
        assert not (out / LOCK_FILE).exists()  # all or nothing
        _write_lock(ckpt, host="elsewhere", pid=os.getpid())  # another host: cannot be checked
        with pytest.raises(RunDirBusy, match="host elsewhere"):
            RunLock([str(ckpt)]).acquire()
        # the same SLURM job's launch that is running now (two steps of one job) is live too
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        _write_lock(ckpt, pid=other.pid, slurm="77/0")
        with pytest.raises(RunDirBusy):
            RunLock([str(ckpt)]).acquire()
    finally:
        other.kill()
        other.wait()


def test_stale_locks_are_taken_over_with_a_warning(tmp_path, caplog, monkeypatch):
    gone = subprocess.Popen(["true"])
    gone.wait()
    _write_lock(tmp_path / "a", pid=gone.pid)  # same host, process gone
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _write_lock(tmp_path / "b", host="elsewhere", pid=1, slurm="77/0")  # this job before its requeue
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / LOCK_FILE).write_text("")  # torn by a crash while written
    lock = RunLock([str(tmp_path / d) for d in "abc"] + [str(tmp_path / "a")])
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert caplog.text.count("taking over the stale lock") == 3
    for d in "abc":
        holder = json.loads((tmp_path / d / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["slurm"] == "77/1"
    with pytest.raises(RunDirBusy):  # held now (by another process than the one asking)
        monkeypatch.setattr(os, "getpid", lambda: 1)
        RunLock([str(tmp_path / "a")]).acquire()
    monkeypatch.undo()
    lock.release()
    assert not any((tmp_path / d / LOCK_FILE).exists() for d in "abc")


def test_resumed_metrics_drop_the_rows_after_the_checkpoint(tmp_path):
    rows = "".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "x'
    (tmp_path / "metrics.jsonl").write_text(rows)
    logger = MetricsLogger(str(tmp_path), 4, first_step=2, tensorboard=False, stream=open(os.devnull, "w"))
    assert logger.dropped_rows == 3
    logger.log(3, {"x": 30.0})
    logger.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_every_launch_config_is_kept(tmp_path):
    first = record_launch(str(tmp_path), {"trainer": {"steps": 4}}, 0)
    second = record_launch(str(tmp_path), {"trainer": {"steps": 8}}, 4)
    assert _listing(tmp_path / "launches") == ["001.yaml", "002.yaml"]
    assert "launch 1" in open(first).read() and "fresh start" in open(first).read()
    assert "steps: 4" in open(first).read()
    assert "launch 2" in open(second).read() and "resumed from step 4" in open(second).read()
    assert (tmp_path / "config.yaml").read_text() == open(second).read()
    assert load_train_config(second).trainer.steps == 8  # each loads as a config


def test_weight_syncs_of_an_earlier_launch_are_removed(tmp_path):
    assert not clean_weight_syncs(str(tmp_path))
    sync = weight_sync_dir(str(tmp_path))
    os.makedirs(os.path.join(sync, "v7"))
    os.makedirs(os.path.join(sync, "v8.tmp"))
    assert clean_weight_syncs(str(tmp_path)) and not os.path.exists(sync)
