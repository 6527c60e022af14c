"""Exported policy weights -> the checkpoint-named buckets vLLM servers load, and the safetensors directory
of the portable weight sync.

The policy's weights arrive on global rank 0 as a ``megatron_papo.models.weight_stream.WeightStream``
(row pieces, at most a buffer's bytes in flight) and are renamed to the source's checkpoint-file names
(Qwen2.5-VL: ``model.layers.*``, ``visual.*``; Qwen3-VL: the in-memory ones). Broadcast sync assembles
whole tensors and sends size-bounded buckets of them (``megatron_papo.models.buckets``), one message each
(``megatron_papo.rollout.weight_group``); directory sync writes each piece into safetensors shards of at
most ``bucket_bytes`` as it arrives, with the writer of every HF export (``hf_directory.write_weights``).
The directory is built as ``<out>.tmp`` and renamed to ``<out>`` once complete: a server never reads a
half-written directory.

With tied embeddings ``lm_head.weight`` (the embedding matrix) is written too, unlike ``save_pretrained``:
vLLM 0.32's in-place ``reload_weights`` re-creates the embedding but puts the output layer's old tensor
back when no ``lm_head.weight`` is loaded, so a tied server would keep sampling with the old head
(tests/test_vllm.py checks the server's log-probs after a sync).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open

from megatron_papo.models.config import load_hf_config
from megatron_papo.models.hf_directory import copy_non_weight_files, replace_directory, write_weights
from megatron_papo.models.weight_stream import BUFFER_BYTES, WeightStream
from megatron_papo.models.weights import HEAD, checkpoint_name


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


def _names_problem(names: set[str], source_dir: str, tied: bool) -> str | None:
    """What is wrong with syncing the tensors ``names`` (checkpoint-file names) into servers started from
    ``source_dir``: they must be exactly its checkpoint's (plus ``lm_head.weight`` when ``tied``)."""
    expected = checkpoint_tensor_names(source_dir) | ({HEAD} if tied else set())
    missing, unexpected = expected - names, names - expected
    if not missing and not unexpected:
        return None
    return (
        f"weight sync: the exported weights do not match the checkpoint of {source_dir!r}: "
        f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), "
        f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})"
    )


def checkpoint_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], source_dir: str, tied: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """The exported (``state_dict()`` name, tensor) pairs as (checkpoint-file name, tensor) pairs.

    Once the pairs are exhausted, the names must have been exactly those of ``source_dir``'s checkpoint
    (plus ``lm_head.weight`` when ``tied``), else ``ValueError`` naming what is missing or unexpected
    (vLLM itself only warns about weights it did not reload). Checked at the end, not on the way: every
    rank must finish the export's gathers.
    """
    model_type = load_hf_config(source_dir).model_type
    seen: set[str] = set()
    for name, tensor in named_tensors:
        file_name = checkpoint_name(name, model_type)
        if file_name in seen:
            raise ValueError(f"weight sync: {name!r} was given twice")
        seen.add(file_name)
        yield file_name, tensor.detach()
    problem = _names_problem(seen, source_dir, tied)
    if problem:
        raise ValueError(problem)


def write_weight_directory(
    named_tensors: WeightStream | Iterable[tuple[str, torch.Tensor]],
    out_dir: str,
    source_dir: str,
    tied: bool,
    bucket_bytes: int,
    buffer_bytes: int = BUFFER_BYTES,
) -> int:
    """Write ``named_tensors`` (an export's stream, or in-memory pairs) as the HF directory ``out_dir``:
    safetensors shards of at most ``bucket_bytes``, written piece by piece (``hf_directory.write_weights``,
    at most ``buffer_bytes`` in flight), plus the non-weight files of ``source_dir``; return the bytes
    written. A wrong set of names (see ``checkpoint_tensors``) raises ``ValueError`` once the stream is
    drained, and nothing is written.
    """
    stream = named_tensors if isinstance(named_tensors, WeightStream) else WeightStream.of(named_tensors)
    model_type = load_hf_config(source_dir).model_type
    problem = _names_problem({checkpoint_name(s.name, model_type) for s in stream.specs}, source_dir, tied)
    if problem:
        for _ in stream.pieces:  # the other ranks' sends
            pass
        raise ValueError(problem)
    out_dir = out_dir.rstrip("/")
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        total = write_weights(stream, tmp, bucket_bytes, buffer_bytes, model_type)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    copy_non_weight_files(source_dir, tmp)
    replace_directory(tmp, out_dir)
    return total
