"""Exported policy weights -> a safetensors directory that vLLM servers reload from (portable weight sync).

The (``state_dict()`` name, full tensor) pairs of ``megatron_papo.models.export_hf_state_dict`` arrive
stream-wise; they are renamed to checkpoint-file names (``model.layers.*``, ``visual.*``) and written
bucket by bucket, one safetensors shard per bucket, so at most one bucket is held in memory. The directory
is built as ``<out>.tmp`` and renamed to ``<out>`` once complete: a server never reads a half-written
directory.

With tied embeddings ``lm_head.weight`` (the embedding matrix) is written too, unlike ``save_pretrained``:
vLLM 0.32's in-place ``reload_weights`` re-creates the embedding but puts the output layer's old tensor
back when no ``lm_head.weight`` is loaded, so a tied server would keep sampling with the old head
(tests/test_vllm.py checks the server's log-probs after a sync).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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


def write_weight_directory(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str,
    source_dir: str,
    tied: bool,
    bucket_bytes: int,
) -> int:
    """Write ``named_tensors`` as the HF directory ``out_dir`` (weights in buckets of about
    ``bucket_bytes``, plus the non-weight files of ``source_dir``); return the bytes written.

    The names written must be exactly those of ``source_dir``'s checkpoint (plus ``lm_head.weight`` when
    ``tied``), else ``ValueError`` naming what is missing or unexpected (vLLM itself only warns about
    weights it did not reload).
    """
    out_dir = out_dir.rstrip("/")
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weight_map: dict[str, str] = {}
    bucket: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal bucket, size
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(bucket, os.path.join(tmp, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(bucket, file))
        bucket, size = {}, 0

    for name, tensor in named_tensors:
        file_name = checkpoint_name(name)
        if file_name in bucket or file_name in weight_map:
            raise ValueError(f"weight sync: {name!r} was given twice")
        tensor = tensor.detach().contiguous().cpu()
        # a tied head is the embedding tensor itself; safetensors refuses to write shared storage
        bucket[file_name] = tensor.clone() if tied and name == HEAD else tensor
        nbytes = tensor.numel() * tensor.element_size()
        size += nbytes
        total += nbytes
        if size >= bucket_bytes:
            flush()
    if bucket:
        flush()
    expected = checkpoint_tensor_names(source_dir) | ({HEAD} if tied else set())
    missing, unexpected = expected - set(weight_map), set(weight_map) - expected
    if missing or unexpected:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(
            f"weight sync: the exported weights do not match the checkpoint of {source_dir!r}: "
            f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})"
        )
    with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    copy_non_weight_files(source_dir, tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return total
