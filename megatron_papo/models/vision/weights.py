"""HF Qwen2.5-VL / Qwen3-VL vision weights <-> this TP rank's shard of ``Qwen25VisionEncoder`` /
``Qwen3VisionEncoder``.

HF names are relative to ``prefix``: ``model.visual.`` in transformers 5's
``Qwen2_5_VLForConditionalGeneration.state_dict()`` (and Qwen3-VL's), ``visual.`` in Qwen2.5-VL checkpoint
files. Each encoder parameter holds one or more HF tensors by a ``megatron_papo.models.layouts.Layout``:

- replicated: the same tensor on every rank (norms, biases added after a row-parallel reduce, Qwen3-VL's
  learned position embeddings);
- the patch embedding: the Conv3d kernel [hidden, C, T, P, P] as the linear map [hidden, C*T*P*P];
- column / row parallel: rows / columns split over TP;
- qkv: HF rows ``[q heads; k heads; v heads]`` -> megatron-core's ``[head0: q k v; head1: q k v; ...]``,
  heads split over TP;
- gated: HF ``gate_proj`` and ``up_proj`` -> ``linear_fc1`` = ``[gate rows; up rows]`` of this rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from megatron.core import parallel_state as ps

from megatron_papo.models import layouts
from megatron_papo.models.layouts import Layout, column, gated
from megatron_papo.models.vision.encoder import Qwen25VisionEncoder
from megatron_papo.models.vision.qwen3_encoder import Qwen3VisionEncoder
from megatron_papo.models.weight_stream import BUFFER_BYTES, WeightStream

Encoder = Qwen25VisionEncoder | Qwen3VisionEncoder


def _merger(
    ours: str, hf: str, hf_layers: tuple[str, str, str], norm_params: tuple[str, ...], rows: Mapping[str, int]
) -> dict[str, Layout]:
    """A patch merger's layouts: ``hf_layers`` names its norm and two linears under ``hf``."""
    hf_norm, hf_fc1, hf_fc2 = hf_layers
    entries = {
        f"{ours}fc1.weight": column(f"{hf}{hf_fc1}.weight", rows[f"{ours}fc1.weight"]),
        f"{ours}fc1.bias": column(f"{hf}{hf_fc1}.bias", rows[f"{ours}fc1.bias"]),
        f"{ours}fc2.weight": Layout((f"{hf}{hf_fc2}.weight",), "columns"),
        f"{ours}fc2.bias": Layout((f"{hf}{hf_fc2}.bias",)),
    }
    return entries | {f"{ours}ln_q.{p}": Layout((f"{hf}{hf_norm}.{p}",)) for p in norm_params}


def _block(
    ours: str, hf: str, norm_params: tuple[str, ...], rows: Mapping[str, int], heads: int
) -> dict[str, Layout]:
    """A vision block's norms and attention (the MLP differs between the towers)."""
    qkv_rows = rows[f"{ours}self_attention.linear_qkv.weight"]
    d = qkv_rows * ps.get_tensor_model_parallel_world_size() // (3 * heads)  # rows per head of q, k and v
    per_head = ((0, d, 0), (0, d, heads * d), (0, d, 2 * heads * d))
    entries = {
        f"{ours}self_attention.linear_proj.weight": Layout((f"{hf}attn.proj.weight",), "columns"),
        f"{ours}self_attention.linear_proj.bias": Layout((f"{hf}attn.proj.bias",)),
    }
    for p in ("weight", "bias"):
        entries[f"{ours}self_attention.linear_qkv.{p}"] = Layout((f"{hf}attn.qkv.{p}",), "rows", per_head)
    for p in norm_params:
        entries[f"{ours}input_layernorm.{p}"] = Layout((f"{hf}norm1.{p}",))
        entries[f"{ours}pre_mlp_layernorm.{p}"] = Layout((f"{hf}norm2.{p}",))
    return entries


def _qwen3_layouts(encoder: Qwen3VisionEncoder, prefix: str, rows: Mapping[str, int]) -> dict[str, Layout]:
    """transformers' ``Qwen3VLVisionModel``: LayerNorms with biases, a plain MLP, DeepStack mergers."""
    both, heads = ("weight", "bias"), encoder.config.num_attention_heads
    entries = {
        "patch_embed.weight": Layout(
            (f"{prefix}patch_embed.proj.weight",), row_shape=encoder.patch_embed.kernel
        ),
        "patch_embed.bias": Layout((f"{prefix}patch_embed.proj.bias",)),
        "pos_embed.weight": Layout((f"{prefix}pos_embed.weight",)),
    }
    hf_layers = ("norm", "linear_fc1", "linear_fc2")
    entries |= _merger("merger.", f"{prefix}merger.", hf_layers, both, rows)
    for i in range(len(encoder.deepstack_mergers)):
        ours, hf = f"deepstack_mergers.{i}.", f"{prefix}deepstack_merger_list.{i}."
        entries |= _merger(ours, hf, hf_layers, both, rows)
    for i in range(len(encoder.decoder.layers)):
        ours, hf = f"decoder.layers.{i}.", f"{prefix}blocks.{i}."
        fc1 = f"{ours}mlp.linear_fc1."
        entries |= _block(ours, hf, both, rows, heads) | {
            f"{fc1}weight": column(f"{hf}mlp.linear_fc1.weight", rows[f"{fc1}weight"]),
            f"{fc1}bias": column(f"{hf}mlp.linear_fc1.bias", rows[f"{fc1}bias"]),
            f"{ours}mlp.linear_fc2.weight": Layout((f"{hf}mlp.linear_fc2.weight",), "columns"),
            f"{ours}mlp.linear_fc2.bias": Layout((f"{hf}mlp.linear_fc2.bias",)),
        }
    return entries


def _qwen25_layouts(encoder: Qwen25VisionEncoder, prefix: str, rows: Mapping[str, int]) -> dict[str, Layout]:
    """transformers' ``Qwen2_5_VisionTransformerPretrainedModel``: RMSNorms, a gated MLP."""
    heads = encoder.config.num_attention_heads
    entries = {
        "patch_embed.weight": Layout(
            (f"{prefix}patch_embed.proj.weight",), row_shape=encoder.patch_embed.kernel
        ),
    } | _merger("merger.", f"{prefix}merger.", ("ln_q", "mlp.0", "mlp.2"), ("weight",), rows)
    for i in range(len(encoder.decoder.layers)):
        ours, hf = f"decoder.layers.{i}.", f"{prefix}blocks.{i}."
        entries |= _block(ours, hf, ("weight",), rows, heads) | {
            f"{ours}mlp.linear_fc2.weight": Layout((f"{hf}mlp.down_proj.weight",), "columns"),
            f"{ours}mlp.linear_fc2.bias": Layout((f"{hf}mlp.down_proj.bias",)),
        }
        for p in ("weight", "bias"):
            fc1 = f"{ours}mlp.linear_fc1.{p}"
            entries[fc1] = gated(f"{hf}mlp.gate_proj.{p}", f"{hf}mlp.up_proj.{p}", rows[fc1])
    return entries


def vision_layouts(encoder: Encoder, prefix: str) -> dict[str, Layout]:
    """Encoder parameter name -> its HF tensors (``prefix`` + HF name) and TP layout, for every parameter
    of ``encoder``."""
    rows = {n: len(p) for n, p in encoder.named_parameters()}
    if isinstance(encoder, Qwen3VisionEncoder):
        entries = _qwen3_layouts(encoder, prefix, rows)
    else:
        entries = _qwen25_layouts(encoder, prefix, rows)
    missing = set(rows) - set(entries)
    if missing:
        raise RuntimeError(f"no HF mapping for vision parameters {sorted(missing)}")
    return entries


@torch.no_grad()
def load_hf_vision_weights(encoder: Encoder, hf_tensors: Mapping, prefix: str) -> None:
    """Copy this TP rank's shard of the HF tensors ``hf_tensors[prefix + name]`` (full tensors, or lazy
    slices of ``weights.HFCheckpoint``: only this rank's rows are read) into ``encoder``.

    Raises ``KeyError`` naming a missing HF tensor, ``ValueError`` naming one of the wrong shape.
    """
    entries = vision_layouts(encoder, prefix)
    sources = {}
    for name, layout in entries.items():
        for hf_name in layout.hf:
            if hf_name not in hf_tensors:
                raise KeyError(f"the HF weights have no vision tensor {hf_name!r} (for {name})")
        sources[name] = [hf_tensors[n] for n in layout.hf]
    layouts.load(dict(encoder.named_parameters()), entries, sources)


def export_hf_vision_weights(encoder: Encoder, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every vision weight, gathered over TP: every rank of the TP group gets
    the same tensors (a collective: all its ranks must iterate it to the end, in step)."""
    params, entries = dict(encoder.named_parameters()), vision_layouts(encoder, prefix)
    pieces = layouts.pieces(params, entries, BUFFER_BYTES, to_first=False)
    return iter(WeightStream(layouts.specs(params, entries), pieces))
