"""HF Qwen2.5-VL / Qwen3-VL weights <-> this rank's megatron-core shard: the one mapping used by the
conversion tool, the embedded rollout engine and vLLM weight sync.

Names are those of transformers' in-memory model, ``Qwen2_5_VLForConditionalGeneration.state_dict()`` or
``Qwen3VLForConditionalGeneration.state_dict()``: ``model.language_model.*``, ``model.visual.*``,
``lm_head.weight`` (also for tied embeddings, where it is the embedding matrix). Qwen2.5-VL checkpoint files
use the older names (``model.layers.*``, ``visual.*``), Qwen3-VL's the in-memory ones; neither holds
``lm_head`` when tied. ``checkpoint_name`` / ``module_name`` convert, and ``HFCheckpoint`` reads both.

Each parameter's HF tensors and TP split are a ``megatron_papo.models.layouts.Layout`` (the vision
tower's from ``megatron_papo.models.vision.weights``). Loading reads only this rank's rows and columns
of each HF tensor; export streams each stage's TP shards as row pieces, a bounded buffer at a time, to
rank 0 or to every rank (``megatron_papo.models.weight_stream``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from megatron.core import parallel_state as ps
from safetensors import safe_open

from megatron_papo.models import layouts
from megatron_papo.models.config import check_model_type
from megatron_papo.models.layouts import Layout, Part, column, gated
from megatron_papo.models.vision.weights import vision_layouts
from megatron_papo.models.weight_stream import BUFFER_BYTES, Piece, TensorSpec, WeightStream, relay

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


def _lm_layer(prefix: str, hf: str, rows: dict[str, int], qkv: tuple[Part, ...]) -> dict[str, Layout]:
    """Layouts of one LM layer, for both megatron-core layer specs (local norms or TE-fused norms), with QKV
    biases (Qwen2.5-VL) or q/k norms (Qwen3-VL) where the layer has them; ``qkv``: the fused qkv's parts."""
    fused_norms = f"{prefix}self_attention.linear_qkv.layer_norm_weight" in rows
    attn, mlp = f"{hf}self_attn.", f"{hf}mlp."
    fc1 = f"{prefix}mlp.linear_fc1.weight"
    optional = {
        f"{prefix}self_attention.linear_qkv.bias": Layout(
            tuple(f"{attn}{p}_proj.bias" for p in "qkv"), "rows", qkv
        ),
        f"{prefix}self_attention.q_layernorm.weight": Layout((f"{attn}q_norm.weight",)),
        f"{prefix}self_attention.k_layernorm.weight": Layout((f"{attn}k_norm.weight",)),
    }
    return {name: layout for name, layout in optional.items() if name in rows} | {
        (
            f"{prefix}self_attention.linear_qkv.layer_norm_weight"
            if fused_norms
            else f"{prefix}input_layernorm.weight"
        ): Layout((f"{hf}input_layernorm.weight",)),
        f"{prefix}self_attention.linear_qkv.weight": Layout(
            tuple(f"{attn}{p}_proj.weight" for p in "qkv"), "rows", qkv
        ),
        f"{prefix}self_attention.linear_proj.weight": Layout((f"{attn}o_proj.weight",), "columns"),
        (
            f"{prefix}mlp.linear_fc1.layer_norm_weight"
            if fused_norms
            else f"{prefix}pre_mlp_layernorm.weight"
        ): Layout((f"{hf}post_attention_layernorm.weight",)),
        fc1: gated(f"{mlp}gate_proj.weight", f"{mlp}up_proj.weight", rows[fc1]),
        f"{prefix}mlp.linear_fc2.weight": Layout((f"{mlp}down_proj.weight",), "columns"),
    }


def _qkv_parts(model) -> tuple[Part, ...]:
    """megatron's fused qkv rows (weight or bias): per query group ``[q heads; k; v]`` of HF's q, k, v."""
    c = model.config
    q_rows = c.num_attention_heads // c.num_query_groups * c.kv_channels
    return ((0, q_rows, 0), (1, c.kv_channels, 0), (2, c.kv_channels, 0))


def parameter_map(model) -> dict[str, Layout]:
    """Megatron parameter name (of this stage, the vision tower's included) -> its HF tensors and TP
    layout. With tied embeddings the last stage's output layer (a copy of the embedding) maps to
    ``lm_head.weight``."""
    rows = {n: len(p) for n, p in model.named_parameters() if not n.startswith("vision.")}
    entries: dict[str, Layout] = {}
    if model.vision is not None:
        entries |= {f"vision.{n}": e for n, e in vision_layouts(model.vision, VISION).items()}
    lm = model.language_model
    offset = lm.decoder.layers[0].layer_number - 1 if len(lm.decoder.layers) else 0
    qkv = _qkv_parts(model)
    for layer in lm.decoder.layers:
        prefix = f"language_model.decoder.layers.{layer.layer_number - 1 - offset}."
        entries |= _lm_layer(prefix, f"{LM}layers.{layer.layer_number - 1}.", rows, qkv)
    if lm.pre_process:
        embedding = "language_model.embedding.word_embeddings.weight"
        entries[embedding] = column(EMBED, rows[embedding])
    if lm.post_process:
        entries["language_model.decoder.final_layernorm.weight"] = Layout((f"{LM}norm.weight",))
        if "language_model.output_layer.weight" in rows:
            entries["language_model.output_layer.weight"] = column(
                HEAD, rows["language_model.output_layer.weight"]
            )
    missing = set(rows) - set(entries)
    if missing:
        raise RuntimeError(f"no HF mapping for megatron parameters {sorted(missing)[:5]}")
    return entries


class StoredTensor:
    """One tensor of a safetensors file, read lazily: ``shape``, and ``[rows]`` / ``[rows, columns]``
    slices read only those bytes."""

    def __init__(self, handle, name: str) -> None:
        self.slice = handle.get_slice(name)
        self.shape = tuple(self.slice.get_shape())

    def __getitem__(self, index) -> torch.Tensor:
        return self.slice[index]


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
        self.handles: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __getitem__(self, name: str) -> StoredTensor:
        if name not in self.files:
            raise KeyError(f"{self.path}: the checkpoint has no tensor {checkpoint_name(name)!r}")
        file, stored = self.files[name]
        if file not in self.handles:
            self.handles[file] = safe_open(os.path.join(self.path, file), "pt")
        return StoredTensor(self.handles[file], stored)


def _check_model_type(hf_dir: str) -> None:
    config = os.path.join(hf_dir, "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            check_model_type(hf_dir, json.load(f).get("model_type"))


@torch.no_grad()
def load_hf_weights(model, hf_dir: str) -> None:
    """Copy the HF weights in ``hf_dir`` into this rank's shard of ``model`` (a ``Qwen25VLModel`` or
    ``Qwen3VLModel`` stage), reading only this rank's rows and columns of each tensor.

    Raises ``ValueError`` for a directory of another model type or a tensor of the wrong shape,
    ``FileNotFoundError`` for missing weight files or shards, ``KeyError`` naming a missing tensor.
    """
    _check_model_type(hf_dir)
    checkpoint = HFCheckpoint(hf_dir)
    entries = parameter_map(model)
    sources = {}
    for name, layout in entries.items():
        hf = layout.hf
        if hf == (HEAD,) and HEAD not in checkpoint and model.hf_config.tie_word_embeddings:
            hf = (EMBED,)  # tied checkpoints store the embedding only
        sources[name] = [checkpoint[n] for n in hf]
    try:
        layouts.load(dict(model.named_parameters()), entries, sources)
    except ValueError as e:
        raise ValueError(f"{hf_dir}: {e}") from e


def export_stream(
    model, to: str = "all", buffer_bytes: int = BUFFER_BYTES, tied_head: bool = True
) -> WeightStream:
    """The whole model's HF tensors (``state_dict()`` names), streamed as row pieces of at most
    ``buffer_bytes`` in flight per rank, to global rank 0 (``to="rank0"``) or to every rank (``"all"``);
    see ``megatron_papo.models.weight_stream``. ``tied_head``: with tied embeddings also give
    ``lm_head.weight`` (the embedding's rows again). A collective: every rank iterates it to the end."""
    if to == "rank0" and ps.get_data_parallel_rank() != 0:
        return WeightStream([], iter(()))  # another replica: rank 0's own replica exports
    entries = parameter_map(model)
    tied = bool(model.hf_config.tie_word_embeddings)
    entries = {n: e for n, e in entries.items() if not (tied and e.hf == (HEAD,))}  # the embedding's copy
    params = dict(model.named_parameters())
    specs = layouts.specs(params, entries)
    pieces = layouts.pieces(params, entries, buffer_bytes, to_first=to == "rank0")
    if tied and tied_head and any(s.name == EMBED for s in specs):
        specs.append(TensorSpec(HEAD, *next((s.dtype, s.shape) for s in specs if s.name == EMBED)))
        pieces = _with_head(pieces)
    return relay(specs, pieces, to)


def _with_head(pieces: Iterator[Piece]) -> Iterator[Piece]:
    for piece in pieces:
        yield piece
        if piece.name == EMBED:
            yield Piece(HEAD, piece.row, piece.tensor)


def export_hf_state_dict(model, buffer_bytes: int = BUFFER_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """(``state_dict()`` name, full CPU tensor) for every weight of the whole model, on every rank, each
    tensor once its rows are in (moved as pieces of at most ``buffer_bytes``). A collective: every rank
    must iterate it to the end."""
    return iter(export_stream(model, to="all", buffer_bytes=buffer_bytes))
