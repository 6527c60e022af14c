"""Atomic, resumable training checkpoints with megatron-core distributed checkpointing.

Layout under ``checkpoint.dir``::

    iter_0000010/      model + optimizer (sharded, any TP/PP layout can load it), scheduler, step, RNG, data
    iter_0000020/
    latest             the step of the newest complete checkpoint (written last, by rename)

A save writes ``iter_N.tmp/`` on all ranks, which fsync it together and wait for every rank, then rank 0
renames it to ``iter_N`` and rewrites ``latest`` through a temporary file, each rename fsynced
(``durable``); a crash at any point leaves the previous checkpoint and ``latest`` intact. Only then are
checkpoints older than ``N`` beyond the newest ``keep_last`` removed; ``N`` and newer ones (left by an
earlier run that got further) never are. An empty, corrupt or missing ``latest`` falls back, with a
warning, to the newest complete ``iter_N`` (a renamed directory is complete).

``resume``: ``true`` (``--resume``) continues from ``latest`` and fails, naming the directory, when there
is nothing to resume; ``auto`` continues when there is a checkpoint and starts fresh otherwise (a job that
is requeued, or resubmitted with the same ``dir``, carries on); ``false`` starts fresh
(``check_fresh_start``).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_papo.training.durable import durable_replace, fsync_tree, write_text_durably

LATEST = "latest"
STEP_DIR = re.compile(r"iter_(\d{7})")
# Optimizer state in the canonical per-parameter form, so a checkpoint loads at any TP / PP / DP layout.
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


@dataclass
class CheckpointConfig:
    """The ``checkpoint`` section."""

    dir: str = "runs/papo/checkpoints"
    save_interval: int = 0  # steps between saves; 0: only at the end of the run
    keep_last: int = 2
    resume: bool | Literal["auto"] = False  # true: continue (an error when nothing is saved); auto: if saved
    overwrite: bool = False  # a new run may replace the checkpoints already in ``dir``

    def __post_init__(self) -> None:
        if self.resume not in (True, False, "auto"):
            raise ValueError(f"checkpoint.resume must be true, false or 'auto', got {self.resume!r}")
        if self.save_interval < 0 or self.keep_last < 1:
            raise ValueError(
                f"checkpoint: need save_interval >= 0 and keep_last >= 1, got "
                f"{self.save_interval} and {self.keep_last}"
            )


def _step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def resume_step(cfg: CheckpointConfig) -> int | None:
    """The step a run continues from (``cfg.resume`` true or auto and a checkpoint saved), or None: a
    fresh start. ``resume: true`` with nothing saved raises ``FileNotFoundError`` naming ``cfg.dir``."""
    if not cfg.resume:
        return None
    step = latest_step(cfg.dir)
    if step is None and cfg.resume is True:
        raise FileNotFoundError(
            f"checkpoint.resume=true (--resume), but {os.path.abspath(cfg.dir)} holds no checkpoint to "
            "resume from: start without --resume, or set checkpoint.resume=auto (resume when there is one)"
        )
    return step


def check_fresh_start(cfg: CheckpointConfig) -> None:
    """Before a run that does not resume: refuse to replace ``cfg.dir``'s checkpoints unless
    ``cfg.overwrite``; with it, global rank 0 removes them (so keep-last pruning sees only the new run)."""
    step = latest_step(cfg.dir)
    if cfg.resume or step is None:
        return
    if not cfg.overwrite:
        raise ValueError(
            f"checkpoint.dir {cfg.dir} already holds a run (step {step}): continue it with --resume "
            "(or checkpoint.resume=auto), start over with checkpoint.overwrite=true, or choose another "
            "checkpoint.dir"
        )
    if dist.get_rank() == 0:
        for name in os.listdir(cfg.dir):
            if name.startswith("iter_") or name.startswith(LATEST):
                path = os.path.join(cfg.dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    dist.barrier()


def saved_steps(root: str) -> list[int]:
    """Steps of the complete checkpoints under ``root`` (``iter_N`` directories: renamed once complete),
    ascending."""
    if not os.path.isdir(root):
        return []
    matches = (STEP_DIR.fullmatch(name) for name in os.listdir(root))
    return sorted(int(m[1]) for m in matches if m and os.path.isdir(os.path.join(root, m[0])))


def latest_step(root: str) -> int | None:
    """Step of the newest complete checkpoint under ``root`` (the one ``latest`` names), or None when
    nothing was saved. When ``latest`` is missing, empty or names no complete checkpoint, the newest
    complete ``iter_N`` with a warning; a ``RuntimeError`` when there is none."""
    path = os.path.join(root, LATEST)
    steps = saved_steps(root)
    text = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
        if text.isdigit() and int(text) in steps:
            return int(text)
    elif not steps:
        return None
    problem = "is missing" if text is None else f"names {text!r}, which is no complete checkpoint"
    if not steps:
        raise RuntimeError(
            f"{path} {problem}, and {root} holds no complete checkpoint (iter_NNNNNNN directory) to fall "
            "back to: restore one, or start over with checkpoint.overwrite=true"
        )
    logging.getLogger(__name__).warning(
        "%s %s; using the newest complete checkpoint, %s", path, problem, _step_dir(root, steps[-1])
    )
    return steps[-1]


def prune(root: str, step: int, keep_last: int) -> None:
    """Keep the ``keep_last`` newest checkpoints up to ``step`` (``step``'s own among them); remove the
    older ones. Checkpoints newer than ``step`` (an earlier run's) are never touched."""
    older = [s for s in saved_steps(root) if s < step]
    for old in older[: max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(_step_dir(root, old))


def publish(root: str, step: int, keep_last: int) -> None:
    """Global rank 0, once every rank has written and flushed ``iter_N.tmp``: rename it to ``iter_N``,
    point ``latest`` at it, prune. Each stage is durable before the next begins."""
    final = _step_dir(root, step)
    if os.path.exists(final):
        shutil.rmtree(final)
    durable_replace(final + ".tmp", final)
    write_text_durably(os.path.join(root, LATEST), str(step))
    prune(root, step, keep_last)


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict[str, int]:
    return {
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_object(rng: dict[str, Any] | None) -> ShardedObject:
    """RNG states, one per (PP, TP, DP) rank: meaningful only when reloaded at the same layout."""
    layout = _layout()
    ranks = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", rng, (layout["pp"], layout["tp"], layout["dp"]), ranks, replica_id=0)


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside megatron-core's DDP wrapper (whose own state dict keys carry a 'module.' prefix)."""
    return getattr(chunk, "module", chunk)


def _sharded_state(model: list[torch.nn.Module], optimizer, rng, with_rng: bool) -> dict[str, Any]:
    model_sd = {
        f"model{i}": _unwrap(chunk).sharded_state_dict(metadata=SHARDING_METADATA)
        for i, chunk in enumerate(model)
    }
    flat_model = {k: v for chunk_sd in model_sd.values() for k, v in chunk_sd.items()}
    state = {"model": model_sd}
    if with_rng:
        state["rng_state"] = _rng_object(rng)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            flat_model, is_loading=rng is None, metadata=SHARDING_METADATA
        )
    return state


def save_checkpoint(
    cfg: CheckpointConfig,
    step: int,
    model: list[torch.nn.Module],
    optimizer,
    scheduler,
    data_state: dict[str, Any] | None,
    common: dict[str, Any] | None = None,
) -> str:
    """Save everything needed to resume after ``step``; returns the checkpoint directory."""
    final = _step_dir(cfg.dir, step)
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(cfg.dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
        os.makedirs(tmp)
    dist.barrier()
    state = _sharded_state(model, optimizer, _rng_state(), with_rng=True)
    state["common"] = {
        "step": step,
        "layout": _layout(),
        "data_state": data_state,
        "scheduler": scheduler.state_dict() if scheduler else None,
        **(common or {}),
    }
    dist_checkpointing.save(state, tmp)
    dist.barrier()  # every file written before any rank flushes its share
    fsync_tree(tmp, dist.get_rank(), dist.get_world_size())
    dist.barrier()
    if dist.get_rank() == 0:
        publish(cfg.dir, step, cfg.keep_last)
    dist.barrier()
    return final


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its Adam state tensors (and step), which the load fills in place.

    megatron-core's DistributedOptimizer.state_dict() needs them to exist; this is what its own loader does.
    The dummy step it takes changes parameters, which the model load then overwrites.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def load_checkpoint(
    cfg: CheckpointConfig, model: list[torch.nn.Module], optimizer, scheduler, step: int | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore model, optimizer, scheduler and RNG from ``step`` (default: latest).

    At the layout it was saved with, RNG states are restored too; at another TP / PP / DP layout, weights and
    optimizer state are resharded and RNG states are left as seeded (they have no meaning across layouts).
    Returns (common state with "step", the data-reader state given to ``save_checkpoint``).
    """
    step = latest_step(cfg.dir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint to resume from in {cfg.dir} (no '{LATEST}' file)")
    path = _step_dir(cfg.dir, step)
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
    same_layout = dist_checkpointing.load_common_state_dict(path)["common"]["layout"] == _layout()
    state = _sharded_state(model, optimizer, None, with_rng=same_layout)
    state["common"] = None
    loaded = dist_checkpointing.load(state, path)
    for i, chunk in enumerate(model):
        _unwrap(chunk).load_state_dict(loaded["model"][f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    common = loaded["common"]
    if scheduler is not None and common["scheduler"] is not None:
        scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return common, common["data_state"]
