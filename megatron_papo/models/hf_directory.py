"""Write a complete HF Qwen2.5-VL directory (weights + the source's config, tokenizer, processor files)."""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_papo.models.weights import export_hf_state_dict

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def save_hf_directory(model, source_dir: str, out_dir: str, max_shard_bytes: int = 4 << 30) -> str:
    """Export ``model`` (all ranks call this: a collective) into ``out_dir`` atomically (global rank 0 writes
    ``out_dir.tmp`` then renames it): safetensors shards + index, plus every non-weight file of
    ``source_dir`` (config, generation config, tokenizer, preprocessor), so transformers and vLLM load it."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in export_hf_state_dict(model):
        if rank0:
            nbytes = tensor.numel() * tensor.element_size()
            if size and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor.contiguous()
            size += nbytes
    if rank0:
        tmp = out_dir.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for entry in os.listdir(source_dir):
            src = os.path.join(source_dir, entry)
            if os.path.isfile(src) and entry not in WEIGHT_FILES and not entry.endswith(".safetensors"):
                shutil.copy2(src, os.path.join(tmp, entry))
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            import json

            weight_map = {}
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, file), metadata={"format": "pt"})
                weight_map |= {k: file for k in shard}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()
    return out_dir
