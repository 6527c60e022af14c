"""HF Qwen2.5-VL / Qwen3-VL vision weights <-> this TP rank's shard of ``Qwen25VisionEncoder`` /
``Qwen3VisionEncoder``.

HF names are relative to ``prefix``: ``model.visual.`` in transformers 5's
``Qwen2_5_VLForConditionalGeneration.state_dict()`` (and Qwen3-VL's), ``visual.`` in Qwen2.5-VL checkpoint
files.
Each encoder parameter is built from one or more HF tensors by a layout:

- ``replicated``: the same tensor on every rank (norms, biases added after a row-parallel reduce);
- ``patch``: the Conv3d kernel [hidden, C, T, P, P] flattened to the linear map [hidden, C*T*P*P];
- ``column`` / ``row``: rows / columns split over TP;
- ``qkv``: HF rows ``[q heads; k heads; v heads]`` -> megatron-core's ``[head0: q k v; head1: q k v; ...]``,
  heads split over TP;
- ``gated``: HF ``gate_proj`` and ``up_proj`` -> ``linear_fc1`` = ``[gate rows; up rows]`` of this rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps

from megatron_papo.models.vision.encoder import Qwen25VisionEncoder
from megatron_papo.models.vision.qwen3_encoder import Qwen3VisionEncoder
from megatron_papo.parallel.gather import tp_gather


@dataclass(frozen=True)
class Entry:
    """One encoder parameter: the HF tensors it holds (relative to the prefix) and its layout."""

    hf: tuple[str, ...]
    layout: str


Encoder = Qwen25VisionEncoder | Qwen3VisionEncoder


def _merger(
    ours: str, hf: str, hf_layers: tuple[str, str, str], norm_params: tuple[str, ...]
) -> dict[str, Entry]:
    """A patch merger's entries: ``hf_layers`` names its norm and two linears under ``hf``."""
    hf_norm, hf_fc1, hf_fc2 = hf_layers
    entries = {
        f"{ours}fc1.weight": Entry((f"{hf}{hf_fc1}.weight",), "column"),
        f"{ours}fc1.bias": Entry((f"{hf}{hf_fc1}.bias",), "column"),
        f"{ours}fc2.weight": Entry((f"{hf}{hf_fc2}.weight",), "row"),
        f"{ours}fc2.bias": Entry((f"{hf}{hf_fc2}.bias",), "replicated"),
    }
    return entries | {f"{ours}ln_q.{p}": Entry((f"{hf}{hf_norm}.{p}",), "replicated") for p in norm_params}


def _block(ours: str, hf: str, norm_params: tuple[str, ...]) -> dict[str, Entry]:
    """A vision block's norms and attention (the MLP differs between the towers)."""
    entries = {
        f"{ours}self_attention.linear_proj.weight": Entry((f"{hf}attn.proj.weight",), "row"),
        f"{ours}self_attention.linear_proj.bias": Entry((f"{hf}attn.proj.bias",), "replicated"),
    }
    for p in ("weight", "bias"):
        entries[f"{ours}self_attention.linear_qkv.{p}"] = Entry((f"{hf}attn.qkv.{p}",), "qkv")
    for p in norm_params:
        entries[f"{ours}input_layernorm.{p}"] = Entry((f"{hf}norm1.{p}",), "replicated")
        entries[f"{ours}pre_mlp_layernorm.{p}"] = Entry((f"{hf}norm2.{p}",), "replicated")
    return entries


def _qwen3_map(encoder: Qwen3VisionEncoder) -> dict[str, Entry]:
    """transformers' ``Qwen3VLVisionModel``: LayerNorms with biases, a plain MLP, DeepStack mergers."""
    both = ("weight", "bias")
    entries = {
        "patch_embed.weight": Entry(("patch_embed.proj.weight",), "patch"),
        "patch_embed.bias": Entry(("patch_embed.proj.bias",), "replicated"),
        "pos_embed.weight": Entry(("pos_embed.weight",), "replicated"),
    }
    layers = ("norm", "linear_fc1", "linear_fc2")
    entries |= _merger("merger.", "merger.", layers, both)
    for i in range(len(encoder.deepstack_mergers)):
        entries |= _merger(f"deepstack_mergers.{i}.", f"deepstack_merger_list.{i}.", layers, both)
    for i in range(len(encoder.decoder.layers)):
        ours, hf = f"decoder.layers.{i}.", f"blocks.{i}."
        entries |= _block(ours, hf, both) | {
            f"{ours}mlp.linear_fc1.weight": Entry((f"{hf}mlp.linear_fc1.weight",), "column"),
            f"{ours}mlp.linear_fc1.bias": Entry((f"{hf}mlp.linear_fc1.bias",), "column"),
            f"{ours}mlp.linear_fc2.weight": Entry((f"{hf}mlp.linear_fc2.weight",), "row"),
            f"{ours}mlp.linear_fc2.bias": Entry((f"{hf}mlp.linear_fc2.bias",), "replicated"),
        }
    return entries


def vision_parameter_map(encoder: Encoder) -> dict[str, Entry]:
    """Encoder parameter name -> its HF tensors and TP layout, for every parameter of ``encoder``."""
    entries = _qwen3_map(encoder) if isinstance(encoder, Qwen3VisionEncoder) else _qwen25_map(encoder)
    missing = {n for n, _ in encoder.named_parameters()} - set(entries)
    if missing:
        raise RuntimeError(f"no HF mapping for vision parameters {sorted(missing)}")
    return entries


def _qwen25_map(encoder: Qwen25VisionEncoder) -> dict[str, Entry]:
    """transformers' ``Qwen2_5_VisionTransformerPretrainedModel``: RMSNorms, a gated MLP."""
    entries = {
        "patch_embed.weight": Entry(("patch_embed.proj.weight",), "patch"),
    } | _merger("merger.", "merger.", ("ln_q", "mlp.0", "mlp.2"), ("weight",))
    for i in range(len(encoder.decoder.layers)):
        ours, hf = f"decoder.layers.{i}.", f"blocks.{i}."
        entries |= _block(ours, hf, ("weight",)) | {
            f"{ours}mlp.linear_fc2.weight": Entry((f"{hf}mlp.down_proj.weight",), "row"),
            f"{ours}mlp.linear_fc2.bias": Entry((f"{hf}mlp.down_proj.bias",), "replicated"),
        }
        for p in ("weight", "bias"):
            gate_up = (f"{hf}mlp.gate_proj.{p}", f"{hf}mlp.up_proj.{p}")
            entries[f"{ours}mlp.linear_fc1.{p}"] = Entry(gate_up, "gated")
    return entries


def _heads(encoder: Encoder) -> int:
    return encoder.config.num_attention_heads


def _shard(encoder: Encoder, entry: Entry, full: list[torch.Tensor]) -> torch.Tensor:
    """Full HF tensors -> this TP rank's shard of one parameter."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if entry.layout == "replicated":
        return full[0]
    if entry.layout == "patch":
        return full[0].reshape(full[0].shape[0], -1)
    if entry.layout == "column":
        return full[0].chunk(tp, dim=0)[rank]
    if entry.layout == "row":
        return full[0].chunk(tp, dim=1)[rank]
    if entry.layout == "gated":
        return torch.cat([t.chunk(tp, dim=0)[rank] for t in full])
    qkv = full[0]  # [3 * heads * d, ...] -> [heads, 3, d, ...]
    per_head = qkv.reshape(3, _heads(encoder), -1, *qkv.shape[1:]).transpose(0, 1)
    return per_head.chunk(tp, dim=0)[rank].reshape(-1, *qkv.shape[1:])


def _unshard(encoder: Encoder, entry: Entry, shards: list[torch.Tensor]) -> list[torch.Tensor]:
    """One parameter's shards from every TP rank -> its full HF tensors."""
    if entry.layout == "replicated":
        return [shards[0]]
    if entry.layout == "patch":
        return [shards[0].reshape(-1, *encoder.patch_embed.kernel)]
    if entry.layout == "column":
        return [torch.cat(shards, dim=0)]
    if entry.layout == "row":
        return [torch.cat(shards, dim=1)]
    if entry.layout == "gated":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    per_head = torch.cat(shards, dim=0).reshape(_heads(encoder), 3, -1, *shards[0].shape[1:])
    return [per_head.transpose(0, 1).reshape(-1, *shards[0].shape[1:])]


@torch.no_grad()
def load_hf_vision_weights(encoder: Encoder, hf_tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Copy this TP rank's shard of the full HF tensors ``hf_tensors[prefix + name]`` into ``encoder``.

    Raises ``KeyError`` naming a missing HF tensor, ``ValueError`` naming one of the wrong shape.
    """
    params = dict(encoder.named_parameters())
    for name, entry in vision_parameter_map(encoder).items():
        full = []
        for hf_name in entry.hf:
            if prefix + hf_name not in hf_tensors:
                raise KeyError(f"the HF weights have no vision tensor {prefix + hf_name!r} (for {name})")
            full.append(hf_tensors[prefix + hf_name])
        local = _shard(encoder, entry, full)
        if local.shape != params[name].shape:
            raise ValueError(
                f"HF vision tensors {[prefix + n for n in entry.hf]} of shapes "
                f"{[tuple(t.shape) for t in full]} do not fit {name} (shard {tuple(params[name].shape)})"
            )
        params[name].copy_(local)


@torch.no_grad()
def export_hf_vision_weights(encoder: Encoder, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every vision weight, gathered over TP: every rank of the TP group gets
    the same tensors (a collective: all its ranks must iterate it to the end, in step)."""
    params = dict(encoder.named_parameters())
    for name, entry in vision_parameter_map(encoder).items():
        full = _unshard(encoder, entry, tp_gather(params[name].detach()))
        yield from zip((prefix + n for n in entry.hf), full, strict=True)
