"""Exported policy weights -> the checkpoint-named buckets vLLM servers load, and the safetensors directory
of the portable weight sync.

The (``state_dict()`` name, full tensor) pairs of ``megatron_papo.models.export_hf_state_dict`` arrive
stream-wise; they are renamed to checkpoint-file names (``model.layers.*``, ``visual.*``) and grouped in
size-bounded buckets (``megatron_papo.models.buckets``), so at most one bucket is held in memory.
Broadcast sync sends each bucket as one message (``megatron_papo.rollout.weight_group``); directory sync
writes one safetensors shard per bucket. The directory is built as ``<out>.tmp`` and renamed to ``<out>``
once complete: a server never reads a half-written directory.

With tied embeddings ``lm_head.weight`` (the embedding matrix) is written too, unlike ``save_pretrained``:
vLLM 0.32's in-place ``reload_weights`` re-creates the embedding but puts the output layer's old tensor
back when no ``lm_head.weight`` is loaded, so a tied server would keep sampling with the old head
(tests/test_vllm.py checks the server's log-probs after a sync).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_papo.models.buckets import buckets, tensor_bytes
from megatron_papo.models.config import load_hf_config
from megatron_papo.models.hf_directory import copy_non_weight_files
from megatron_papo.models.weights import HEAD, INDEX, checkpoint_name


def checkpoint_tensor_names(hf_dir: str) -> set[str]:
    """Names of the tensors in the safetensors files of the HF directory ``hf_dir``."""
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {hf_dir!r}")
    names: set[str] = set()
    for file in files:
        with safe_open(os.path.join(hf_dir, file), framework="pt") as f:
            names.update(f.keys())
    return names


def checkpoint_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], source_dir: str, tied: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """The exported (``state_dict()`` name, tensor) pairs as (checkpoint-file name, tensor) pairs.

    Once the pairs are exhausted, the names must have been exactly those of ``source_dir``'s checkpoint
    (plus ``lm_head.weight`` when ``tied``), else ``ValueError`` naming what is missing or unexpected
    (vLLM itself only warns about weights it did not reload). Checked at the end, not on the way: every
    rank must finish the export's gathers.
    """
    expected = checkpoint_tensor_names(source_dir) | ({HEAD} if tied else set())
    model_type = load_hf_config(source_dir).model_type
    seen: set[str] = set()
    for name, tensor in named_tensors:
        file_name = checkpoint_name(name, model_type)
        if file_name in seen:
            raise ValueError(f"weight sync: {name!r} was given twice")
        seen.add(file_name)
        yield file_name, tensor.detach()
    missing, unexpected = expected - seen, seen - expected
    if missing or unexpected:
        raise ValueError(
            f"weight sync: the exported weights do not match the checkpoint of {source_dir!r}: "
            f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})"
        )


def write_weight_directory(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str,
    source_dir: str,
    tied: bool,
    bucket_bytes: int,
) -> int:
    """Write ``named_tensors`` as the HF directory ``out_dir`` (weights in buckets of at most
    ``bucket_bytes``, ``megatron_papo.models.buckets``, plus the non-weight files of ``source_dir``); return
    the bytes written. A wrong set of names (see ``checkpoint_tensors``) raises ``ValueError`` and leaves
    nothing behind.
    """
    out_dir = out_dir.rstrip("/")
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weight_map: dict[str, str] = {}
    total = 0
    try:
        pairs = checkpoint_tensors(named_tensors, source_dir, tied)
        for i, bucket in enumerate(buckets(pairs, bucket_bytes)):
            file = f"model-{i + 1:05d}.safetensors"
            # a tied head is the embedding tensor itself; safetensors refuses to write shared storage
            tensors = {name: (t.clone() if name == HEAD else t).contiguous().cpu() for name, t in bucket}
            save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            total += sum(tensor_bytes(t) for t in tensors.values())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    copy_non_weight_files(source_dir, tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return total
