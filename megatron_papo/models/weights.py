"""HF Qwen2.5-VL / Qwen3-VL weights <-> this rank's megatron-core shard: the one mapping used by the
conversion tool, the embedded rollout engine and vLLM weight sync.

Names are those of transformers' in-memory model, ``Qwen2_5_VLForConditionalGeneration.state_dict()`` or
``Qwen3VLForConditionalGeneration.state_dict()``: ``model.language_model.*``, ``model.visual.*``,
``lm_head.weight`` (also for tied embeddings, where it is the embedding matrix). Qwen2.5-VL checkpoint files
use the older names (``model.layers.*``, ``visual.*``), Qwen3-VL's the in-memory ones; neither holds
``lm_head`` when tied. ``checkpoint_name`` / ``module_name`` convert, and ``HFCheckpoint`` reads both.

Each LM parameter is described by the HF tensors it holds and how it is split over TP: ``replicated``,
``column`` (rows split), ``row`` (columns split), ``qkv`` (q/k/v fused per query group, megatron's
layout), ``fc1`` (gate and up fused per TP shard); the vision tower's tensors go through
``megatron_papo.models.vision.weights``. Export gathers the shards over TP and streams each pipeline
stage's tensors from that stage to every rank, bucket by bucket.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from safetensors import safe_open

from megatron_papo.models.buckets import buckets
from megatron_papo.models.config import check_model_type
from megatron_papo.models.vision import export_hf_vision_weights, load_hf_vision_weights
from megatron_papo.parallel.gather import tp_gather

LM, VISION, HEAD = "model.language_model.", "model.visual.", "lm_head.weight"
EMBED = f"{LM}embed_tokens.weight"
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"


def checkpoint_name(name: str, model_type: str = "qwen2_5_vl") -> str:
    """A ``state_dict()`` name -> its name in the checkpoint files of ``model_type`` (the HF config's)."""
    if model_type == "qwen3_vl":
        return name
    if name.startswith(VISION):
        return "visual." + name[len(VISION) :]
    if name.startswith(LM):
        return "model." + name[len(LM) :]
    return name


def module_name(name: str) -> str:
    """A name from a checkpoint file (either convention) -> its ``state_dict()`` name."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith((LM, VISION)):
        return LM + name[len("model.") :]
    return name


@dataclass(frozen=True)
class Entry:
    hf: tuple[str, ...]
    kind: str


def _lm_layer(prefix: str, hf: str, names: set[str]) -> dict[str, Entry]:
    """Entries of one LM layer, for both megatron-core layer specs (local norms or TE-fused norms), with QKV
    biases (Qwen2.5-VL) or q/k norms (Qwen3-VL) where the layer has them."""
    fused_norms = f"{prefix}self_attention.linear_qkv.layer_norm_weight" in names
    attn, mlp = f"{hf}self_attn.", f"{hf}mlp."
    optional = {
        f"{prefix}self_attention.linear_qkv.bias": Entry(tuple(f"{attn}{p}_proj.bias" for p in "qkv"), "qkv"),
        f"{prefix}self_attention.q_layernorm.weight": Entry((f"{attn}q_norm.weight",), "replicated"),
        f"{prefix}self_attention.k_layernorm.weight": Entry((f"{attn}k_norm.weight",), "replicated"),
    }
    return {name: entry for name, entry in optional.items() if name in names} | {
        (
            f"{prefix}self_attention.linear_qkv.layer_norm_weight"
            if fused_norms
            else f"{prefix}input_layernorm.weight"
        ): Entry((f"{hf}input_layernorm.weight",), "replicated"),
        f"{prefix}self_attention.linear_qkv.weight": Entry(
            tuple(f"{attn}{p}_proj.weight" for p in "qkv"), "qkv"
        ),
        f"{prefix}self_attention.linear_proj.weight": Entry((f"{attn}o_proj.weight",), "row"),
        (
            f"{prefix}mlp.linear_fc1.layer_norm_weight"
            if fused_norms
            else f"{prefix}pre_mlp_layernorm.weight"
        ): Entry((f"{hf}post_attention_layernorm.weight",), "replicated"),
        f"{prefix}mlp.linear_fc1.weight": Entry((f"{mlp}gate_proj.weight", f"{mlp}up_proj.weight"), "fc1"),
        f"{prefix}mlp.linear_fc2.weight": Entry((f"{mlp}down_proj.weight",), "row"),
    }


def parameter_map(model) -> dict[str, Entry]:
    """Megatron LM parameter name (of this stage) -> its HF tensors and TP layout. With tied embeddings
    the last stage's output layer (a copy of the embedding) maps to ``lm_head.weight``."""
    names = {n for n, _ in model.named_parameters() if not n.startswith("vision.")}
    entries: dict[str, Entry] = {}
    lm = model.language_model
    offset = lm.decoder.layers[0].layer_number - 1 if len(lm.decoder.layers) else 0
    for layer in lm.decoder.layers:
        prefix = f"language_model.decoder.layers.{layer.layer_number - 1 - offset}."
        entries |= _lm_layer(prefix, f"{LM}layers.{layer.layer_number - 1}.", names)
    if lm.pre_process:
        entries["language_model.embedding.word_embeddings.weight"] = Entry((EMBED,), "column")
    if lm.post_process:
        entries["language_model.decoder.final_layernorm.weight"] = Entry((f"{LM}norm.weight",), "replicated")
        if "language_model.output_layer.weight" in names:
            entries["language_model.output_layer.weight"] = Entry((HEAD,), "column")
    missing = names - set(entries)
    if missing:
        raise RuntimeError(f"no HF mapping for megatron parameters {sorted(missing)[:5]}")
    return entries


def _lm_dims(model) -> tuple[int, int, int]:
    c = model.config
    return c.num_attention_heads, c.num_query_groups, c.kv_channels


def _to_local(model, entry: Entry, full: list[torch.Tensor]) -> torch.Tensor:
    """Full HF tensors -> this TP rank's shard of one megatron parameter."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if entry.kind == "replicated":
        return full[0]
    if entry.kind == "column":
        return full[0].chunk(tp, dim=0)[rank]
    if entry.kind == "row":
        return full[0].chunk(tp, dim=1)[rank]
    if entry.kind == "fc1":
        return torch.cat([t.chunk(tp, dim=0)[rank] for t in full])
    heads, groups, dim = _lm_dims(model)  # qkv
    q, k, v = full
    per = heads // groups
    q = q.reshape(groups, per * dim, *q.shape[1:])
    k, v = k.reshape(groups, dim, *k.shape[1:]), v.reshape(groups, dim, *v.shape[1:])
    fused = torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])
    return fused.chunk(tp, dim=0)[rank]


def _to_full(model, entry: Entry, shards: list[torch.Tensor]) -> list[torch.Tensor]:
    """This parameter's shards from every TP rank -> the full HF tensors."""
    if entry.kind == "replicated":
        return [shards[0]]
    if entry.kind == "column":
        return [torch.cat(shards, dim=0)]
    if entry.kind == "row":
        return [torch.cat(shards, dim=1)]
    if entry.kind == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    heads, groups, dim = _lm_dims(model)
    per = heads // groups
    fused = torch.cat(shards, dim=0).reshape(groups, (per + 2) * dim, *shards[0].shape[1:])
    q, k, v = fused.split([per * dim, dim, dim], dim=1)
    return [t.reshape(-1, *shards[0].shape[1:]) for t in (q, k, v)]


class HFCheckpoint:
    """Lazy access, by ``state_dict()`` name, to the tensors of an HF safetensors directory (one file or
    an index with shards; checkpoint-file or in-memory names). Every shard must exist."""

    def __init__(self, path: str) -> None:
        if os.path.exists(os.path.join(path, INDEX)):
            with open(os.path.join(path, INDEX), encoding="utf-8") as f:
                file_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(path, SINGLE)):
            with safe_open(os.path.join(path, SINGLE), "pt") as f:
                file_map = {k: SINGLE for k in f.keys()}  # noqa: SIM118
        else:
            raise FileNotFoundError(f"{path}: no {SINGLE} or {INDEX}")
        missing = sorted({f for f in file_map.values() if not os.path.isfile(os.path.join(path, f))})
        if missing:
            raise FileNotFoundError(f"{path}: weight shards listed in {INDEX} are missing: {missing}")
        self.path = path
        self.files = {module_name(k): (file, k) for k, file in file_map.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"{self.path}: the checkpoint has no tensor {checkpoint_name(name)!r}")
        file, stored = self.files[name]
        with safe_open(os.path.join(self.path, file), "pt") as f:
            return f.get_tensor(stored)


def _check_model_type(hf_dir: str) -> None:
    config = os.path.join(hf_dir, "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            check_model_type(hf_dir, json.load(f).get("model_type"))


@torch.no_grad()
def load_hf_weights(model, hf_dir: str) -> None:
    """Copy the HF weights in ``hf_dir`` into this rank's shard of ``model`` (a ``Qwen25VLModel`` or
    ``Qwen3VLModel`` stage).

    Raises ``ValueError`` for a directory of another model type or a tensor of the wrong shape,
    ``FileNotFoundError`` for missing weight files or shards, ``KeyError`` naming a missing tensor.
    """
    _check_model_type(hf_dir)
    checkpoint = HFCheckpoint(hf_dir)
    params = dict(model.named_parameters())
    for name, entry in parameter_map(model).items():
        hf = entry.hf
        if hf == (HEAD,) and HEAD not in checkpoint and model.hf_config.tie_word_embeddings:
            hf = (EMBED,)  # tied checkpoints store the embedding only
        local = _to_local(model, entry, [checkpoint[n] for n in hf])
        if local.shape != params[name].shape:
            raise ValueError(
                f"{hf_dir}: {[checkpoint_name(n) for n in hf]} give {name} shape {tuple(local.shape)}, "
                f"the model expects {tuple(params[name].shape)}"
            )
        params[name].copy_(local)
    if model.vision is not None:
        load_hf_vision_weights(model.vision, checkpoint, VISION)


def _stage_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's (name, full tensor) pairs, gathered over TP (a TP collective)."""
    params = dict(model.named_parameters())
    tied = bool(model.hf_config.tie_word_embeddings)
    if model.vision is not None:
        yield from export_hf_vision_weights(model.vision, VISION)
    for name, entry in parameter_map(model).items():
        full = _to_full(model, entry, tp_gather(params[name].detach()))
        if entry.hf == (HEAD,) and tied:
            continue  # the embedding's copy: exported with the embedding
        yield from zip(entry.hf, full, strict=True)
        if entry.hf == (EMBED,) and tied:
            yield HEAD, full[0]


@torch.no_grad()
def export_hf_state_dict(model, bucket_bytes: int = 256 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """(``state_dict()`` name, full CPU tensor) for every weight of the whole model, on every rank, stage
    by stage in buckets of at most ``bucket_bytes`` (``megatron_papo.models.buckets``). A collective:
    every rank must iterate it to the end. With tied embeddings ``lm_head.weight`` is the same tensor as
    the embedding."""
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        for name, tensor in _stage_tensors(model):
            yield name, tensor.cpu()
        return
    group, me = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_rank()
    local = buckets(((name, tensor.cpu()) for name, tensor in _stage_tensors(model)), bucket_bytes)
    for stage in range(pp):
        src = dist.get_global_rank(group, stage)
        while True:
            payload = [next(local, []) if stage == me else []]  # an empty bucket: the stage is done
            dist.broadcast_object_list(payload, src=src, group=group)
            if not payload[0]:
                break
            yield from payload[0]
