"""Write a complete HF Qwen2.5-VL or Qwen3-VL directory (weights + the source's config, tokenizer, processor
files)."""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

from megatron_papo.models.safetensors_writer import SafetensorsWriter
from megatron_papo.models.weight_stream import BUFFER_BYTES, TensorSpec, WeightStream
from megatron_papo.models.weights import INDEX, checkpoint_name, export_stream

SHARD_BYTES = 4 << 30  # transformers' default: shards of at most 4 GiB


def copy_non_weight_files(source_dir: str, out_dir: str) -> None:
    """Copy every file of ``source_dir`` but the safetensors weights (config, generation config, tokenizer,
    chat template, preprocessor) into ``out_dir``."""
    for entry in sorted(os.listdir(source_dir)):
        src = os.path.join(source_dir, entry)
        if os.path.isfile(src) and entry != INDEX and not entry.endswith(".safetensors"):
            shutil.copy2(src, os.path.join(out_dir, entry))


def write_weights(
    stream: WeightStream, out_dir: str, max_shard_bytes: int, buffer_bytes: int, model_type: str
) -> int:
    """Write ``stream`` (``state_dict()`` names) into ``out_dir`` as safetensors with the checkpoint-file
    names of ``model_type`` (the HF config's), each piece as it arrives (``SafetensorsWriter``); return the
    bytes of the tensors."""
    specs = [TensorSpec(checkpoint_name(s.name, model_type), s.dtype, s.shape) for s in stream.specs]
    with SafetensorsWriter(out_dir, specs, max_shard_bytes, buffer_bytes) as writer:
        for piece in stream.pieces:
            writer.write(checkpoint_name(piece.name, model_type), piece.row, piece.tensor)
        return writer.close()


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> None:
    """In-memory ``tensors`` (checkpoint-file names) as ``model.safetensors`` or numbered shards plus an
    index."""
    stream = WeightStream.of(tensors.items())
    largest = max((s.nbytes for s in stream.specs), default=0)  # already in memory: no tighter bound
    with SafetensorsWriter(out_dir, stream.specs, max_shard_bytes, largest) as writer:
        for piece in stream.pieces:
            writer.write(piece.name, piece.row, piece.tensor)
        writer.close()


def replace_directory(tmp: str, out_dir: str) -> None:
    """Move the complete directory ``tmp`` to ``out_dir``, replacing an older one only then."""
    old = out_dir + ".old"
    if os.path.exists(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def save_hf_directory(
    model,
    source_dir: str,
    out_dir: str,
    max_shard_bytes: int = SHARD_BYTES,
    buffer_bytes: int = BUFFER_BYTES,
) -> str:
    """Export ``model`` into the HF directory ``out_dir``; every rank calls this (a collective).

    The weights stream to global rank 0 (``weights.export_stream``: at most ``buffer_bytes`` of tensor
    data in flight on any rank), which writes them into ``out_dir.tmp`` as they arrive (safetensors with
    checkpoint-file names, as transformers' ``save_pretrained`` writes them, plus the non-weight files of
    ``source_dir``) and renames it to ``out_dir``, replacing an older one only then: a crash never leaves
    a half-written ``out_dir``.
    """
    stream = export_stream(model, to="rank0", buffer_bytes=buffer_bytes, tied_head=False)
    out_dir = out_dir.rstrip("/")
    if dist.get_rank() != 0:
        for _ in stream.pieces:  # take part in the gathers and sends
            pass
    else:
        tmp = out_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        copy_non_weight_files(source_dir, tmp)
        write_weights(stream, tmp, max_shard_bytes, buffer_bytes, model.hf_config.model_type)
        replace_directory(tmp, out_dir)
    dist.barrier()
    return out_dir
