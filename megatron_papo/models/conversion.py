"""HF Qwen2.5-VL directory <-> megatron-core distributed checkpoint, at any TP x PP layout.

A converted checkpoint is a ``dist_checkpointing`` directory holding ``{"model": {"model0": ...}}`` (the
nesting of the trainer's checkpoints, so ``mcore_to_hf`` also exports a training checkpoint
``iter_N``) plus ``hf/``, the source's non-weight files (config, tokenizer, processor). Inputs are
checked before any process starts; outputs are written beside the target (``<out>.tmp``) and renamed
into place only when complete, and an existing output is never overwritten.

Both directions run on ``tp * pp`` processes: under ``torchrun`` (``WORLD_SIZE`` set) the current ones,
otherwise local processes started here (gloo on CPU, NCCL with GPUs).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

import torch
import torch.multiprocessing as mp
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch.multiprocessing.spawn import ProcessException

from megatron_papo.models.config import DTYPES, ModelConfig, check_layout, load_hf_config
from megatron_papo.models.hf_directory import copy_non_weight_files, save_hf_directory
from megatron_papo.models.weights import HFCheckpoint
from megatron_papo.parallel.ports import free_port

HF_FILES = "hf"  # the source's config / tokenizer / processor files inside a converted checkpoint
# how the ranks of a conversion outside torchrun / srun start (the tests fork them from a fork server)
START_METHOD = "spawn"


def model_state(model) -> dict:
    """The sharded state dict saved and loaded by the conversion (and nested as the trainer nests it)."""
    return {"model": {"model0": model.sharded_state_dict()}}


def _dtype(hf_config, dtype: str | None) -> str:
    """``dtype`` or the HF config's own (transformers' ``dtype``), as a ``ModelConfig.dtype`` name."""
    if dtype is None:
        found = getattr(hf_config, "dtype", None) or torch.float32
        dtype = str(found).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    return dtype


def _check_output(out_dir: str) -> None:
    if os.path.exists(out_dir):
        raise FileExistsError(f"output {out_dir} already exists; remove it or choose another path")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"output {out_dir}: parent directory {parent} does not exist")


def _hf_to_mcore_rank(hf_dir: str, out_dir: str, dtype: str) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_papo.models.build import build_model
    from megatron_papo.models.weights import load_hf_weights

    model = build_model(ModelConfig(hf_path=hf_dir, dtype=dtype))
    load_hf_weights(model, hf_dir)
    tmp = out_dir + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed conversion
        os.makedirs(tmp)
    dist.barrier()
    dist_checkpointing.save(model_state(model), tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        os.makedirs(os.path.join(tmp, HF_FILES))
        copy_non_weight_files(hf_dir, os.path.join(tmp, HF_FILES))
        os.replace(tmp, out_dir)
    dist.barrier()


def load_mcore_model(ckpt_dir: str, hf_dir: str, dtype: str):
    """This rank's stage of the model of ``hf_dir``'s config with the weights of the distributed checkpoint
    ``ckpt_dir``; ``ValueError`` when the checkpoint lacks tensors the model needs."""
    from megatron.core import dist_checkpointing

    from megatron_papo.models.build import build_model

    model = build_model(ModelConfig(hf_path=hf_dir, dtype=dtype))
    state = model_state(model)
    stored = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    missing = sorted({t.key for t in nested_values(state) if isinstance(t, ShardedTensor)} - set(stored))
    if missing:
        raise ValueError(
            f"{ckpt_dir} has no {missing[:3]} ({len(missing)} missing), which the model of {hf_dir} needs "
            "(another model size, or tied vs untied embeddings?)"
        )
    loaded = dist_checkpointing.load(state, ckpt_dir)
    model.load_state_dict(loaded["model"]["model0"])
    return model


def _mcore_to_hf_rank(ckpt_dir: str, hf_dir: str, out_dir: str, dtype: str) -> None:
    model = load_mcore_model(ckpt_dir, hf_dir, dtype)
    save_hf_directory(model, hf_dir, out_dir)  # itself atomic: out_dir.tmp, then rename


def _worker(
    rank: int, world: int, port: int, errors: str, tp: int, pp: int, fn: Callable, args: tuple
) -> None:
    """One local rank; a failure is also written to ``errors/rank<N>`` for the parent's message."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        _run(tp, pp, fn, args)
    except Exception as e:
        with open(os.path.join(errors, f"rank{rank}"), "w", encoding="utf-8") as f:
            f.write(f"{type(e).__name__}: {e}")
        raise


def _run(tp: int, pp: int, fn: Callable, args: tuple) -> None:
    from megatron_papo.parallel import ParallelConfig, destroy_distributed, initialize_distributed

    initialize_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    try:
        fn(*args)
    finally:
        destroy_distributed()


def _launch(tp: int, pp: int, fn: Callable, args: tuple) -> None:
    if "WORLD_SIZE" in os.environ:  # under torchrun / srun: these processes are the ranks
        _run(tp, pp, fn, args)
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as errors:
        try:
            mp.start_processes(
                _worker,
                args=(tp * pp, port, errors, tp, pp, fn, args),
                nprocs=tp * pp,
                start_method=START_METHOD,
            )
        except ProcessException as e:
            reports = []
            for name in sorted(os.listdir(errors)):
                with open(os.path.join(errors, name), encoding="utf-8") as f:
                    reports.append(f"{name}: {f.read()}")
            raise RuntimeError(f"conversion failed: {'; '.join(reports) or e}") from e


def hf_to_mcore(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, dtype: str | None = None) -> str:
    """Convert the HF directory ``hf_dir`` into the distributed checkpoint ``out_dir`` (saved from a
    TP x PP layout; it loads at any layout). Returns ``out_dir``."""
    hf_config = load_hf_config(hf_dir)
    HFCheckpoint(hf_dir)  # weight files and every shard present
    check_layout(hf_config, tp, pp)
    dtype = _dtype(hf_config, dtype)
    out_dir = out_dir.rstrip("/")
    _check_output(out_dir)
    try:
        _launch(tp, pp, _hf_to_mcore_rank, (hf_dir, out_dir, dtype))
    finally:
        shutil.rmtree(out_dir + ".tmp", ignore_errors=True)
    return out_dir


def mcore_to_hf(
    ckpt_dir: str, out_dir: str, tp: int = 1, pp: int = 1, hf_dir: str | None = None, dtype: str | None = None
) -> str:
    """Export the distributed checkpoint ``ckpt_dir`` (a converted one or a trainer's ``iter_N``) to the HF
    directory ``out_dir``, loading it at TP x PP. ``hf_dir`` supplies config, tokenizer and processor
    (default: the checkpoint's ``hf/``). Returns ``out_dir``."""
    from megatron.core import dist_checkpointing

    if not os.path.isdir(ckpt_dir) or not dist_checkpointing.check_is_distributed_checkpoint(ckpt_dir):
        raise ValueError(f"{ckpt_dir} is not a megatron-core distributed checkpoint")
    hf_dir = hf_dir or os.path.join(ckpt_dir, HF_FILES)
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{ckpt_dir} has no {HF_FILES}/ with the HF config; pass the HF directory")
    hf_config = load_hf_config(hf_dir)
    check_layout(hf_config, tp, pp)
    dtype = _dtype(hf_config, dtype)
    out_dir = out_dir.rstrip("/")
    _check_output(out_dir)
    try:
        _launch(tp, pp, _mcore_to_hf_rank, (ckpt_dir, hf_dir, out_dir, dtype))
    finally:
        shutil.rmtree(out_dir + ".tmp", ignore_errors=True)
    return out_dir
