"""HF Qwen2.5-VL weights <-> this rank's megatron-core shard: the one mapping used by the conversion tool,
the embedded rollout engine and vLLM weight sync.

Each megatron parameter is described by the HF tensors it holds and how it is split over TP:
``replicated``, ``column`` (rows split), ``row`` (columns split), ``qkv`` (LM: q/k/v fused per query
group, megatron's layout), ``fc1`` (LM: gate and up fused per TP shard), ``vqkv`` (vision: q/k/v per
head shard), ``patch`` (the Conv3d patch embedding as a linear map). Export gathers the shards over TP
and streams each pipeline stage's tensors from that stage to every rank, bucket by bucket.
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

# names as in Qwen2.5-VL checkpoint files (what transformers writes to disk and vLLM loads)
LM, VISION = "model.", "visual."


@dataclass(frozen=True)
class Entry:
    hf: tuple[str, ...]
    kind: str


def _lm_layer(prefix: str, hf: str, names: set[str]) -> dict[str, Entry]:
    """Entries of one LM layer, for both megatron-core layer specs (local norms or TE-fused norms)."""
    fused_norms = f"{prefix}self_attention.linear_qkv.layer_norm_weight" in names
    attn, mlp = f"{hf}self_attn.", f"{hf}mlp."
    return {
        (
            f"{prefix}self_attention.linear_qkv.layer_norm_weight"
            if fused_norms
            else f"{prefix}input_layernorm.weight"
        ): Entry((f"{hf}input_layernorm.weight",), "replicated"),
        f"{prefix}self_attention.linear_qkv.weight": Entry(
            tuple(f"{attn}{p}_proj.weight" for p in "qkv"), "qkv"
        ),
        f"{prefix}self_attention.linear_qkv.bias": Entry(tuple(f"{attn}{p}_proj.bias" for p in "qkv"), "qkv"),
        f"{prefix}self_attention.linear_proj.weight": Entry((f"{attn}o_proj.weight",), "row"),
        (
            f"{prefix}mlp.linear_fc1.layer_norm_weight"
            if fused_norms
            else f"{prefix}pre_mlp_layernorm.weight"
        ): Entry((f"{hf}post_attention_layernorm.weight",), "replicated"),
        f"{prefix}mlp.linear_fc1.weight": Entry((f"{mlp}gate_proj.weight", f"{mlp}up_proj.weight"), "fc1"),
        f"{prefix}mlp.linear_fc2.weight": Entry((f"{mlp}down_proj.weight",), "row"),
    }


def _vision_entries(model) -> dict[str, Entry]:
    out = {
        "vision.patch_embed.weight": Entry((f"{VISION}patch_embed.proj.weight",), "patch"),
        "vision.merger.ln_q.weight": Entry((f"{VISION}merger.ln_q.weight",), "replicated"),
        "vision.merger.fc1.weight": Entry((f"{VISION}merger.mlp.0.weight",), "column"),
        "vision.merger.fc1.bias": Entry((f"{VISION}merger.mlp.0.bias",), "column"),
        "vision.merger.fc2.weight": Entry((f"{VISION}merger.mlp.2.weight",), "row"),
        "vision.merger.fc2.bias": Entry((f"{VISION}merger.mlp.2.bias",), "replicated"),
    }
    for i in range(len(model.vision.blocks)):
        ours, hf = f"vision.blocks.{i}.", f"{VISION}blocks.{i}."
        out |= {
            f"{ours}norm1.weight": Entry((f"{hf}norm1.weight",), "replicated"),
            f"{ours}norm2.weight": Entry((f"{hf}norm2.weight",), "replicated"),
            f"{ours}qkv.weight": Entry((f"{hf}attn.qkv.weight",), "vqkv"),
            f"{ours}qkv.bias": Entry((f"{hf}attn.qkv.bias",), "vqkv"),
            f"{ours}proj.weight": Entry((f"{hf}attn.proj.weight",), "row"),
            f"{ours}proj.bias": Entry((f"{hf}attn.proj.bias",), "replicated"),
        }
        for name in ("gate_proj", "up_proj"):
            out |= {
                f"{ours}{name}.{p}": Entry((f"{hf}mlp.{name}.{p}",), "column") for p in ("weight", "bias")
            }
        out |= {
            f"{ours}down_proj.weight": Entry((f"{hf}mlp.down_proj.weight",), "row"),
            f"{ours}down_proj.bias": Entry((f"{hf}mlp.down_proj.bias",), "replicated"),
        }
    return out


def parameter_map(model) -> dict[str, Entry]:
    """Megatron parameter name (of this stage) -> its HF tensors and TP layout."""
    names = {n for n, _ in model.named_parameters()}
    entries: dict[str, Entry] = _vision_entries(model) if model.vision is not None else {}
    lm = model.language_model
    for layer in lm.decoder.layers:
        prefix = f"language_model.decoder.layers.{layer.layer_number - 1 - _layer_offset(lm)}."
        entries |= _lm_layer(prefix, f"{LM}layers.{layer.layer_number - 1}.", names)
    if lm.pre_process:
        entries["language_model.embedding.word_embeddings.weight"] = Entry(
            (f"{LM}embed_tokens.weight",), "column"
        )
    if lm.post_process:
        entries["language_model.decoder.final_layernorm.weight"] = Entry((f"{LM}norm.weight",), "replicated")
        if "language_model.output_layer.weight" in names:
            tied = model.hf_config.tie_word_embeddings
            entries["language_model.output_layer.weight"] = Entry(
                (f"{LM}embed_tokens.weight" if tied else "lm_head.weight",), "column"
            )
    missing = names - set(entries)
    if missing:
        raise RuntimeError(f"no HF mapping for megatron parameters {sorted(missing)[:5]}")
    return entries


def _layer_offset(lm) -> int:
    return lm.decoder.layers[0].layer_number - 1 if len(lm.decoder.layers) else 0


def _lm_dims(model) -> tuple[int, int, int]:
    c = model.config
    return c.num_attention_heads, c.num_query_groups, c.kv_channels


def _to_local(model, entry: Entry, full: list[torch.Tensor]) -> torch.Tensor:
    """Full HF tensors -> this TP rank's shard of one megatron parameter."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if entry.kind == "replicated":
        return full[0]
    if entry.kind == "patch":
        return full[0].reshape(full[0].shape[0], -1)
    if entry.kind == "column":
        return full[0].chunk(tp, dim=0)[rank]
    if entry.kind == "row":
        return full[0].chunk(tp, dim=1)[rank]
    if entry.kind == "fc1":
        return torch.cat([t.chunk(tp, dim=0)[rank] for t in full])
    if entry.kind == "vqkv":
        return torch.cat([t.chunk(tp, dim=0)[rank] for t in full[0].chunk(3, dim=0)])
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
    if entry.kind == "patch":
        v = model.vision.hf_vision
        return [shards[0].reshape(-1, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)]
    if entry.kind == "column":
        return [torch.cat(shards, dim=0)]
    if entry.kind == "row":
        return [torch.cat(shards, dim=1)]
    if entry.kind == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    if entry.kind == "vqkv":
        parts = [s.chunk(3, dim=0) for s in shards]
        return [torch.cat([torch.cat([p[j] for p in parts]) for j in range(3)])]
    heads, groups, dim = _lm_dims(model)
    per = heads // groups
    fused = torch.cat(shards, dim=0).reshape(groups, (per + 2) * dim, *shards[0].shape[1:])
    q, k, v = fused.split([per * dim, dim, dim], dim=1)
    return [t.reshape(-1, *shards[0].shape[1:]) for t in (q, k, v)]


class HFCheckpoint:
    """Lazy access to the tensors of an HF safetensors directory (sharded or not)."""

    def __init__(self, path: str) -> None:
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        self.path, self.weight_map = path, weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.path}: the checkpoint has no tensor {name!r}")
        file = os.path.join(self.path, self.weight_map[name])
        if not os.path.exists(file):
            raise FileNotFoundError(f"{self.path}: shard {self.weight_map[name]} (holding {name}) is missing")
        with safe_open(file, "pt") as f:
            return f.get_tensor(name)


@torch.no_grad()
def load_hf_weights(model, hf_dir: str) -> None:
    """Copy the HF weights in ``hf_dir`` into this rank's shard of ``model``."""
    checkpoint = HFCheckpoint(hf_dir)
    params = dict(model.named_parameters())
    for name, entry in parameter_map(model).items():
        local = _to_local(model, entry, [checkpoint.get(n) for n in entry.hf])
        if local.shape != params[name].shape:
            raise ValueError(
                f"{hf_dir}: {entry.hf} gives {name} shape {tuple(local.shape)}, the model expects "
                f"{tuple(params[name].shape)}"
            )
        params[name].copy_(local)


def _tp_gather(shard: torch.Tensor) -> list[torch.Tensor]:
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return [shard]
    shards = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(shards, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
    return shards


@torch.no_grad()
def export_hf_state_dict(model, bucket_bytes: int = 256 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every weight, on every rank, stage by stage in buckets (a collective)."""
    params = dict(model.named_parameters())
    local: list[tuple[str, torch.Tensor]] = []
    for name, entry in parameter_map(model).items():
        for hf_name, tensor in zip(entry.hf, _to_full(model, entry, _tp_gather(params[name])), strict=True):
            if not (hf_name == f"{LM}embed_tokens.weight" and name.endswith("output_layer.weight")):
                local.append((hf_name, tensor.detach().cpu()))
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        yield from local
        return
    group = ps.get_pipeline_model_parallel_group()
    me = ps.get_pipeline_model_parallel_rank()
    for stage in range(pp):
        buckets: list[list] = [[]]
        if stage == me:
            size = 0
            for item in local:
                if size and size + item[1].numel() * item[1].element_size() > bucket_bytes:
                    buckets.append([])
                    size = 0
                buckets[-1].append(item)
                size += item[1].numel() * item[1].element_size()
        count = [len(buckets)]
        dist.broadcast_object_list(count, src=dist.get_global_rank(group, stage), group=group)
        for i in range(count[0]):
            payload = [buckets[i] if stage == me else None]
            dist.broadcast_object_list(payload, src=dist.get_global_rank(group, stage), group=group)
            yield from payload[0]
