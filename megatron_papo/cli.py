"""``megatron-papo``: train, eval, sft and plan; launched by ``torchrun`` or ``srun`` (a process per rank)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from megatron_papo.console import debug_mode, log_to_file, quiet_libraries, quiet_transformers, run_log_path

if TYPE_CHECKING:
    from megatron_papo.config import TrainConfig


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. trainer.steps=3")


def _load_config(args: argparse.Namespace, overrides: list[str]) -> TrainConfig:
    """The run's config; this rank's library log goes to its output directory from now on."""
    from megatron_papo.config import load_train_config
    from megatron_papo.parallel import read_launch_env

    quiet_transformers()
    cfg = load_train_config(args.config, overrides)
    log_to_file(run_log_path(cfg.trainer.output_dir, read_launch_env().rank))
    return cfg


def _run_loop(args: argparse.Namespace) -> None:
    if args.command == "sft":
        from megatron_papo.sft import SFTTrainer as Loop
    else:
        from megatron_papo.trainer import Trainer as Loop

    from megatron_papo.loop import TrainingDiverged
    from megatron_papo.training.preemption import EXIT_STOPPED_EARLY, StoppedEarly, ignore_exit_signals

    overrides = list(args.overrides) + (["checkpoint.resume=true"] if args.resume else [])
    try:
        Loop(_load_config(args, overrides)).run()
    except TrainingDiverged as e:
        sys.exit(f"megatron-papo: stopped: {e}")
    except StoppedEarly as e:
        ignore_exit_signals()  # the exit status must stay 75 (see there)
        print(f"megatron-papo: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_STOPPED_EARLY)


def _eval(args: argparse.Namespace) -> None:
    import json

    import torch.distributed as dist

    from megatron_papo.evaluate import evaluate
    from megatron_papo.parallel import initialize_distributed
    from megatron_papo.policy import Policy
    from megatron_papo.training.checkpointing import CheckpointConfig, load_checkpoint

    cfg = _load_config(args, args.overrides)
    initialize_distributed(cfg.parallel, seed=cfg.trainer.seed)
    policy = Policy(cfg, total_optimizer_steps=None)
    step = 0
    if args.checkpoint:
        common, _ = load_checkpoint(CheckpointConfig(dir=args.checkpoint), policy.model, None, None)
        step = common["step"]
    policy.sync_rollout_weights(step)
    results = evaluate(cfg, policy, step) | {"step": step}
    if dist.get_rank() == 0:
        out = args.output or os.path.join(cfg.trainer.output_dir, f"eval_step{step}.json")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        print(json.dumps(results, indent=1))
        print(f"wrote {os.path.abspath(out)}")


def main(argv: list[str] | None = None) -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(prog="megatron-papo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    for name, text in (
        ("train", "PAPO / GRPO / DAPO training"),
        ("sft", "supervised warm start on the reference solutions (exports an HF directory)"),
    ):
        loop = sub.add_parser(name, help=text)
        _add_run_args(loop)
        loop.add_argument(
            "--resume",
            action="store_true",
            help="continue from the latest checkpoint (an error when there is none; "
            "checkpoint.resume=auto: continue when there is one)",
        )
        loop.set_defaults(func=_run_loop)

    ev = sub.add_parser("eval", help="test accuracy with original and masked images")
    _add_run_args(ev)
    ev.add_argument("--checkpoint", help="a training checkpoint directory (default: the model's HF weights)")
    ev.add_argument("--output", help="where to write the JSON results")
    ev.set_defaults(func=_eval)

    try:
        from megatron_papo.planner import cli as planner_cli
    except ImportError:
        planner_cli = None
    if planner_cli is not None:
        planner_cli.add_parser(sub)

    from megatron_papo.training.run_dir import RunDirBusy

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RunDirBusy) as e:  # bad config, data, paths: one clear line
        if debug_mode():
            raise
        sys.exit(f"megatron-papo: error: {e}\n(set MEGATRON_PAPO_DEBUG=1 for the traceback)")


if __name__ == "__main__":
    main()
