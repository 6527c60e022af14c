"""The main job through the real CLI under torchrun, for the end-to-end tests (tiny model: the
``tiny_model`` fixture in conftest.py).

``train`` is one launch of one run. ``train_in_one_launch`` (``cli_in_one_launch``: any commands) runs
several single-process runs one after the other in one launch (this file is then torchrun's worker
script, ``_run_all``): each through ``megatron_papo.cli.main`` as in its own launch, with its own console
output and exit status, for one start-up instead of one each (a process spends ~15 s importing torch,
megatron-core and transformers).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")

Result = tuple[list[dict], subprocess.CompletedProcess]


def job_overrides(out: Path, model: str, *overrides: str) -> list[str]:
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


def train_args(out: Path, model: str, overrides: Sequence[str]) -> list[str]:
    """``megatron-papo train``'s arguments: tiny sizes plus ``overrides``, into ``out``."""
    return ["train", "--config", CONFIG, *job_overrides(out, model, *overrides)]


# what differs between runs that compute the same (each step's timings)
TIMINGS = ("perf/", "rollout/time_s", "rollout/tokens_per_s")


def untimed(row: dict) -> dict:
    """A metrics row without its timings: what an exact resume must reproduce bit for bit."""
    return {k: v for k, v in row.items() if not k.startswith(TIMINGS)}


def _torchrun(procs: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--standalone", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _failed(result: subprocess.CompletedProcess) -> AssertionError:
    return AssertionError(
        f"{' '.join(result.args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )


def metrics_rows(out: Path) -> list[dict]:
    """The rows of ``out/metrics.jsonl`` (none when it does not exist)."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train(
    tmp_path: Path, name: str, model: str, procs: int = 1, *overrides: str, check: bool = True
) -> Result:
    """``megatron-papo train`` on ``procs`` processes, tiny sizes plus ``overrides``, into ``tmp_path/name``:
    its ``metrics.jsonl`` rows and the finished process (``check``: a failure raises with its output)."""
    out = tmp_path / name
    result = _torchrun(procs, "-m", "megatron_papo.cli", *train_args(out, model, overrides))
    if check and result.returncode != 0:
        raise _failed(result)
    return metrics_rows(out), result


def train_in_one_launch(tmp_path: Path, model: str, runs: Mapping[str, Sequence[str]]) -> dict[str, Result]:
    """``train(tmp_path, name, model, 1, *overrides, check=False)`` for each ``name: overrides`` of ``runs``,
    one after the other in one single-process torchrun launch (``cli_in_one_launch``)."""
    spec = {name: train_args(tmp_path / name, model, overrides) for name, overrides in runs.items()}
    return cli_in_one_launch(tmp_path, spec)


def cli_in_one_launch(tmp_path: Path, runs: Mapping[str, list[str]]) -> dict[str, Result]:
    """``megatron-papo ARGS`` for each ``name: ARGS`` of ``runs`` (any command), one after the other in
    one single-process torchrun launch (``_run_all``); each run's ``metrics.jsonl`` rows are read from
    ``tmp_path/name``. Each run's result holds its exit status and its console output, its ``args`` the
    CLI's arguments. One process only: megatron-core keeps layout state beyond ``destroy_model_parallel``
    (a 4-process TP=2 x PP=2 run followed by a TP=2 x DP=2 one in one launch failed the second's
    checkpoint), and a failed rank would leave the others waiting."""
    console = tmp_path / "console"
    console.mkdir()
    (console / "runs.json").write_text(json.dumps(runs))
    launch = _torchrun(1, os.path.abspath(__file__), str(console), timeout=900)
    if launch.returncode != 0:
        raise _failed(launch)
    results = {}
    for name, args in runs.items():
        run = json.loads((console / f"{name}.json").read_text())
        finished = subprocess.CompletedProcess(args, run["returncode"], run["stdout"], run["stderr"])
        results[name] = metrics_rows(tmp_path / name), finished
    return results


def _run_one(args: list[str], scratch: str) -> dict:
    """``megatron_papo.cli.main(args)`` on this process as the interpreter would run it alone: its exit
    status (``sys.exit(message)``: 1, the message on stderr; an uncaught exception: 1, its traceback) and
    what it wrote to stdout and stderr (through ``scratch/1`` and ``scratch/2``). Afterwards megatron-core's
    groups are destroyed (the default process group stays for the next run: torchrun's store would not
    host a second one) and the log handlers the run added are removed."""
    from megatron.core import parallel_state

    from megatron_papo import cli

    loggers = (logging.getLogger(), logging.getLogger("megatron_papo"))
    handlers = [list(logger.handlers) for logger in loggers]
    streams = {1: sys.stdout, 2: sys.stderr}
    saved = {fd: os.dup(fd) for fd in streams}
    for fd, stream in streams.items():
        stream.flush()
        with open(os.path.join(scratch, str(fd)), "wb") as f:
            os.dup2(f.fileno(), fd)
    try:
        cli.main(args)
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except Exception:
        traceback.print_exc()
        status = 1
    finally:
        for fd, stream in streams.items():
            stream.flush()
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
        parallel_state.destroy_model_parallel()
        for logger, kept in zip(loggers, handlers, strict=True):
            for handler in [h for h in logger.handlers if h not in kept]:
                logger.removeHandler(handler)
                handler.close()
    output = {
        name: Path(scratch, str(fd)).read_text(errors="replace")
        for fd, name in ((1, "stdout"), (2, "stderr"))
    }
    return {"returncode": status, **output}


def _run_all(console: str) -> None:
    """torchrun's worker for ``train_in_one_launch``: each run of ``console/runs.json``, its result into
    ``console/NAME.json``."""
    runs = json.loads(Path(console, "runs.json").read_text())
    for name, args in runs.items():
        Path(console, f"{name}.json").write_text(json.dumps(_run_one(args, console)))


if __name__ == "__main__":
    _run_all(sys.argv[1])
