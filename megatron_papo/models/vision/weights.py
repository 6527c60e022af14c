"""HF Qwen2.5-VL vision weights <-> this TP rank's shard of ``Qwen25VisionEncoder``.

HF names are relative to ``prefix``: ``model.visual.`` in transformers 5's
``Qwen2_5_VLForConditionalGeneration.state_dict()``, ``visual.`` in Qwen2.5-VL checkpoint files.
Each encoder parameter holds one or more HF tensors by a ``megatron_papo.models.layouts.Layout``:

- replicated: the same tensor on every rank (norms, biases added after a row-parallel reduce);
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
from megatron_papo.models.weight_stream import BUFFER_BYTES, WeightStream


def vision_layouts(encoder: Qwen25VisionEncoder, prefix: str) -> dict[str, Layout]:
    """Encoder parameter name -> its HF tensors (``prefix`` + HF name) and TP layout, for every parameter
    of ``encoder``."""
    rows = {n: len(p) for n, p in encoder.named_parameters()}
    heads = encoder.config.num_attention_heads
    tp = ps.get_tensor_model_parallel_world_size()
    entries = {
        "patch_embed.weight": Layout(
            (f"{prefix}patch_embed.proj.weight",), row_shape=encoder.patch_embed.kernel
        ),
        "merger.ln_q.weight": Layout((f"{prefix}merger.ln_q.weight",)),
        "merger.fc1.weight": column(f"{prefix}merger.mlp.0.weight", rows["merger.fc1.weight"]),
        "merger.fc1.bias": column(f"{prefix}merger.mlp.0.bias", rows["merger.fc1.bias"]),
        "merger.fc2.weight": Layout((f"{prefix}merger.mlp.2.weight",), "columns"),
        "merger.fc2.bias": Layout((f"{prefix}merger.mlp.2.bias",)),
    }
    for i in range(len(encoder.decoder.layers)):
        ours, hf = f"decoder.layers.{i}.", f"{prefix}blocks.{i}."
        qkv = f"{ours}self_attention.linear_qkv.weight"
        d = rows[qkv] * tp // (3 * heads)  # rows per head of q, k and v
        per_head = ((0, d, 0), (0, d, heads * d), (0, d, 2 * heads * d))
        entries |= {
            f"{ours}input_layernorm.weight": Layout((f"{hf}norm1.weight",)),
            qkv: Layout((f"{hf}attn.qkv.weight",), "rows", per_head),
            f"{ours}self_attention.linear_qkv.bias": Layout((f"{hf}attn.qkv.bias",), "rows", per_head),
            f"{ours}self_attention.linear_proj.weight": Layout((f"{hf}attn.proj.weight",), "columns"),
            f"{ours}self_attention.linear_proj.bias": Layout((f"{hf}attn.proj.bias",)),
            f"{ours}pre_mlp_layernorm.weight": Layout((f"{hf}norm2.weight",)),
            f"{ours}mlp.linear_fc2.weight": Layout((f"{hf}mlp.down_proj.weight",), "columns"),
            f"{ours}mlp.linear_fc2.bias": Layout((f"{hf}mlp.down_proj.bias",)),
        }
        for p in ("weight", "bias"):
            fc1 = f"{ours}mlp.linear_fc1.{p}"
            entries[fc1] = gated(f"{hf}mlp.gate_proj.{p}", f"{hf}mlp.up_proj.{p}", rows[fc1])
    missing = set(rows) - set(entries)
    if missing:
        raise RuntimeError(f"no HF mapping for vision parameters {sorted(missing)}")
    return entries


@torch.no_grad()
def load_hf_vision_weights(encoder: Qwen25VisionEncoder, hf_tensors: Mapping, prefix: str) -> None:
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


def export_hf_vision_weights(encoder: Qwen25VisionEncoder, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every vision weight, gathered over TP: every rank of the TP group gets
    the same tensors (a collective: all its ranks must iterate it to the end, in step)."""
    params, entries = dict(encoder.named_parameters()), vision_layouts(encoder, prefix)
    pieces = layouts.pieces(params, entries, BUFFER_BYTES, to_first=False)
    return iter(WeightStream(layouts.specs(params, entries), pieces))
