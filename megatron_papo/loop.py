"""What every training loop shares (RL and SFT): bring-up, steps, metrics, evaluation and checkpoints.

A subclass builds its ``policy`` (a ``Policy``) and implements ``headline()`` (its first console line) and
``train_step() -> StepOutcome``; ``run()`` does the rest: metrics averaged over ranks and written by rank 0
(JSONL, TensorBoard, W&B / MLflow), periodic evaluation, atomic checkpoints every
``checkpoint.save_interval`` steps and at the end, resume with ``checkpoint.resume``, and an early stop
with a checkpoint on SIGTERM / SIGUSR1 or ``trainer.exit_after_minutes`` (``training.preemption``). Global
rank 0 locks the output and checkpoint directories for the run and records its launch
(``training.run_dir``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_papo.config import TrainConfig
from megatron_papo.config_io import to_dict
from megatron_papo.data.encode import EncodedPrompt
from megatron_papo.evaluate import evaluate
from megatron_papo.models.config import load_hf_config
from megatron_papo.parallel import initialize_distributed
from megatron_papo.parallel.device import current_device
from megatron_papo.policy import Policy
from megatron_papo.run_summary import describe_run
from megatron_papo.training.checkpointing import (
    check_fresh_start,
    latest_step,
    load_checkpoint,
    resume_step,
    save_checkpoint,
)
from megatron_papo.training.metrics import MetricsLogger, read_metrics
from megatron_papo.training.preemption import EarlyExit, StoppedEarly
from megatron_papo.training.progress import progress_lines
from megatron_papo.training.prompts import PromptSource
from megatron_papo.training.run_dir import RunLock, clean_weight_syncs, record_launch
from megatron_papo.training.trackers import InputImages, build_trackers


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def average_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each key averaged over the ranks that report it (loss metrics exist on last pipeline stages only)."""
    everyone: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, metrics)
    keys = {k for m in everyone for k in m}
    return {k: _mean([m[k] for m in everyone if k in m]) for k in sorted(keys)}


@dataclass
class StepOutcome:
    """One step: its metrics (this rank's, to log), whether its optimizer updates were skipped (a NaN /
    inf loss or gradient; agreed by every rank) and this rank's prompts (their images go to trackers)."""

    metrics: dict[str, float]
    skipped: bool
    prompts: list[EncodedPrompt] = field(default_factory=list)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


class TrainingLoop:
    """Subclasses set ``self.policy`` in ``build()`` and implement ``train_step()``."""

    policy: Policy

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        hf_config = load_hf_config(cfg.model.hf_path)  # a wrong model path fails before any heavy work
        launch = initialize_distributed(cfg.parallel, seed=cfg.trainer.seed)
        self.early_exit = EarlyExit(cfg.trainer.exit_after_minutes)
        self.out_dir = cfg.trainer.output_dir
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        backend = f"{current_device().type}, {dist.get_backend()}"
        for line in describe_run(cfg, self.headline(), hf_config, launch, backend, self.rolls_out()):
            self.log(line)
        self._lock_run_dirs()
        resume_from = resume_step(cfg.checkpoint)
        if resume_from is None:
            check_fresh_start(cfg.checkpoint)
        self.prompts = PromptSource(
            cfg.model.hf_path, cfg.data, cfg.masking, cfg.reward, self.out_dir, self.dp_rank, self.dp_size
        )
        self.step = 0
        self.build()
        if resume_from is not None:
            self._resume(resume_from)
        if self.policy.engine is not None:
            self.policy.sync_rollout_weights(self.step)
        self.metrics: MetricsLogger | None = None
        if dist.get_rank() == 0:
            config = to_dict(cfg)
            trackers = build_trackers(
                cfg.logging.wandb, cfg.logging.mlflow, config, self.out_dir, resumed=self.step > 0
            )
            self.metrics = MetricsLogger(
                self.out_dir, cfg.trainer.steps, self.step, cfg.logging.tensorboard, trackers=trackers
            )
            if trackers:
                self.log("  tracking " + "; ".join(t.describe() for t in trackers))
            if self.metrics.dropped_rows:
                self.log(f"  dropped {self.metrics.dropped_rows} metrics rows after step {self.step}")
            record_launch(self.out_dir, config, self.step)

    def _lock_run_dirs(self) -> None:
        """Global rank 0 locks the output and checkpoint directories (every rank raises ``RunDirBusy``
        when another run holds one) and removes the weight syncs of an earlier launch."""
        error: list[Exception | None] = [None]
        if dist.get_rank() == 0:
            try:
                RunLock([self.out_dir, self.cfg.checkpoint.dir]).acquire()
            except Exception as e:
                error[0] = e
            else:
                if clean_weight_syncs(self.out_dir):
                    self.log("  removed the vLLM weight syncs of an earlier launch")
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise error[0]

    def per_rank(self, prompts: int, sequences_per_prompt: int, name: str) -> int:
        """``prompts`` (global) per DP rank; they must fill whole micro-batches."""
        mbs = self.cfg.trainer.micro_batch_size
        if prompts % self.dp_size or (prompts // self.dp_size * sequences_per_prompt) % mbs:
            raise ValueError(
                f"trainer.{name}={prompts} prompts x {sequences_per_prompt} sequences each must "
                f"split evenly over {self.dp_size} data-parallel ranks into micro-batches of {mbs}"
            )
        return prompts // self.dp_size

    def headline(self) -> str:
        """What the run does, for its first console line."""
        raise NotImplementedError

    def rolls_out(self) -> bool:
        """Whether the run generates responses (its first console lines say with what)."""
        return True

    def build(self) -> None:
        raise NotImplementedError

    def train_step(self) -> StepOutcome:
        raise NotImplementedError

    def after_step(self, metrics: dict[str, float]) -> bool:
        """Look at the step's averaged metrics (may add to them); True stops the run."""
        return False

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def data_position(self) -> dict[str, Any]:
        """Where this rank's prompts resume after ``self.step`` (a loader state dict, saved per DP rank)."""
        return self.prompts.state_dict()

    def close(self) -> None:
        """Stop what runs beside the loop (called once ``run`` returns or raises)."""

    def run(self) -> None:
        """Train to ``trainer.steps``; raises ``StoppedEarly`` after saving when a signal or the time
        budget stops the run first."""
        try:
            self._run()
        finally:
            self.close()

    def _run(self) -> None:
        cfg = self.cfg
        stop = False
        early: str | None = None
        bad_steps = 0
        first = self.step
        if cfg.eval.at_start and self.step == 0:
            self._log_metrics(average_over_ranks(evaluate(cfg, self.policy, self.step)))
        while self.step < cfg.trainer.steps and not stop:
            self.step += 1
            outcome = self.train_step()
            metrics = outcome.metrics
            last = self.step == cfg.trainer.steps
            exiting = cfg.trainer.exit_after_steps and self.step - first == cfg.trainer.exit_after_steps
            if exiting and not last:
                self.log(
                    f"step {self.step}: trainer.exit_after_steps={cfg.trainer.exit_after_steps} reached; "
                    "resume with --resume"
                )
                stop = True
            if cfg.eval.interval and (self.step % cfg.eval.interval == 0 or last):
                metrics |= evaluate(cfg, self.policy, self.step)
            metrics = average_over_ranks(metrics)
            stop = self.after_step(metrics) or stop
            self._log_metrics(metrics, outcome.prompts)
            bad_steps = bad_steps + 1 if outcome.skipped else 0
            if bad_steps:
                self.log(f"step {self.step}: non-finite loss or grad, update skipped ({bad_steps} in a row)")
            if bad_steps >= cfg.trainer.max_bad_steps:  # no save: the weights may be what diverged
                saved = latest_step(cfg.checkpoint.dir)
                raise TrainingDiverged(
                    f"{bad_steps} consecutive steps with a non-finite loss or grad (trainer.max_bad_steps="
                    f"{cfg.trainer.max_bad_steps}); stopping at step {self.step}; "
                    + (f"the step-{saved} checkpoint is untouched" if saved else "nothing was saved")
                )
            if not last and (early := self.early_exit.reason()):
                self.log(f"step {self.step}: {early}; saving and stopping")
                stop = True
            interval = cfg.checkpoint.save_interval
            if (interval and self.step % interval == 0) or last or stop:
                self.save()
        if self.step == cfg.trainer.steps:
            self.finish()
        if self.metrics is not None:
            if self.step > first:  # this launch logged rows
                for line in progress_lines(read_metrics(self.metrics.jsonl_path)):
                    self.metrics.message(line)
            self.metrics.message(
                f"done: metrics {self.metrics.jsonl_path}, TensorBoard {self.metrics.tb_dir}, "
                f"checkpoints {os.path.abspath(cfg.checkpoint.dir)}"
            )
            self.metrics.close()
        if early:
            raise StoppedEarly(self.step, early)

    def _log_metrics(self, metrics: dict[str, float], prompts: Sequence[EncodedPrompt] = ()) -> None:
        """Rank 0 logs the step's averaged ``metrics`` (with its input images when a tracker wants them)."""
        if self.metrics is not None:
            images = self._input_images(prompts) if self.metrics.wants_images(self.step) else []
            self.metrics.log(self.step, metrics, images)

    def _input_images(self, prompts: Sequence[EncodedPrompt]) -> list[InputImages]:
        """The first ``logging.wandb.image_prompts`` prompts' images at this step, original and masked."""
        chosen = prompts[: self.cfg.logging.wandb.image_prompts]
        return [images for p in chosen if (images := self.prompts.input_images(p, self.step)) is not None]

    def finish(self) -> None:
        """Called once when the last step is done (all ranks)."""

    def log(self, text: str) -> None:
        if dist.get_rank() == 0:
            print(text, flush=True)

    def save(self) -> None:
        states: list[dict] = [{} for _ in range(self.dp_size)]
        dist.all_gather_object(states, self.data_position(), group=ps.get_data_parallel_group())
        path = save_checkpoint(
            self.cfg.checkpoint,
            self.step,
            self.policy.model,
            self.policy.optimizer,
            self.policy.scheduler,
            data_state={"loaders": states},
            common=self.extra_state(),
        )
        self.log(f"saved checkpoint {os.path.abspath(path)}")

    def _resume(self, step: int) -> None:
        common, data_state = load_checkpoint(
            self.cfg.checkpoint, self.policy.model, self.policy.optimizer, self.policy.scheduler, step
        )
        loaders = data_state["loaders"]
        if len(loaders) != self.dp_size:
            raise ValueError(
                f"checkpoint in {self.cfg.checkpoint.dir} was saved with {len(loaders)} data-parallel "
                f"ranks, this run has {self.dp_size}: the data order cannot be resumed"
            )
        self.prompts.load_state_dict(loaders[self.dp_rank])
        self.load_extra_state(common)
        self.step = common["step"]
        self.log(f"resumed from step {self.step} of {os.path.abspath(self.cfg.checkpoint.dir)}")
