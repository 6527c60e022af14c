"""Write a complete HF Qwen2.5-VL directory (weights + the source's config, tokenizer, processor files)."""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_papo.models.buckets import buckets, tensor_bytes
from megatron_papo.models.weights import HEAD, INDEX, SINGLE, checkpoint_name, export_hf_state_dict


def copy_non_weight_files(source_dir: str, out_dir: str) -> None:
    """Copy every file of ``source_dir`` but the safetensors weights (config, generation config, tokenizer,
    chat template, preprocessor) into ``out_dir``."""
    for entry in sorted(os.listdir(source_dir)):
        src = os.path.join(source_dir, entry)
        if os.path.isfile(src) and entry != INDEX and not entry.endswith(".safetensors"):
            shutil.copy2(src, os.path.join(out_dir, entry))


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> None:
    """``tensors`` (checkpoint-file names) as ``model.safetensors`` or numbered shards plus an index."""
    shards = [{name: t.contiguous() for name, t in b} for b in buckets(tensors.items(), max_shard_bytes)]
    if len(shards) <= 1:
        save_file(shards[0] if shards else {}, os.path.join(out_dir, SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    total = sum(tensor_bytes(t) for t in tensors.values())
    with open(os.path.join(out_dir, INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_hf_directory(model, source_dir: str, out_dir: str, max_shard_bytes: int = 4 << 30) -> str:
    """Export ``model`` into the HF directory ``out_dir``; every rank calls this (a collective).

    Global rank 0 writes ``out_dir.tmp`` (safetensors with checkpoint-file names, as transformers'
    ``save_pretrained`` writes them, plus the non-weight files of ``source_dir``) and renames it to
    ``out_dir``, replacing an older one only then: a crash never leaves a half-written ``out_dir``.
    """
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    tied = bool(model.hf_config.tie_word_embeddings)
    tensors = {}
    for name, tensor in export_hf_state_dict(model):
        if rank0 and not (tied and name == HEAD):
            tensors[checkpoint_name(name, model.hf_config.model_type)] = tensor
    if rank0:
        out_dir = out_dir.rstrip("/")
        tmp = out_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        copy_non_weight_files(source_dir, tmp)
        write_safetensors(tensors, tmp, max_shard_bytes)
        old = out_dir + ".old"
        if os.path.exists(out_dir):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return out_dir
