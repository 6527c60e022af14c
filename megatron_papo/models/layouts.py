"""Where the rows of HF tensors lie in a megatron parameter's tensor-parallel shard: the one description
that loading (HF slices -> this rank's shard) and export (shard rows -> HF rows, streamed) both read.

A parameter holds one or more HF tensors (``Layout.hf``). Its TP shard is a sequence of row ``Block``s,
each a contiguous range of the shard's rows that is a contiguous range of one HF tensor's rows:

- ``split="none"``: every TP rank holds the whole tensor (norms, biases added after a reduce);
- ``split="columns"``: rank r holds column block r of every row (row-parallel linears);
- ``split="rows"``: the shard is ``units`` repetitions of ``parts``, each part ``(hf index, rows, base)``;
  unit u of rank r is global unit ``U = r * units + u`` and its part lands at HF rows
  ``base + U * rows``. Column-parallel: one part; gate / up fused: two; megatron's fused qkv: per query
  group (LM: three tensors) or per head (vision: one tensor, q / k / v bases a third apart).

``row_shape``: an HF row's trailing dims when they are not the shard's (the patch embedding's Conv3d
kernel); the bytes of a row are the same either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps

from megatron_papo.models.weight_stream import Piece, TensorSpec
from megatron_papo.parallel.gather import tp_gather

Part = tuple[int, int, int]  # (hf index, rows per unit, base row)


@dataclass(frozen=True)
class Layout:
    hf: tuple[str, ...]
    split: str = "none"
    parts: tuple[Part, ...] = ()
    row_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Block:
    """Shard rows ``[start, stop)`` = rows ``[hf_row, hf_row + stop - start)`` of HF tensor ``hf``."""

    start: int
    stop: int
    hf: int
    hf_row: int


def column(hf: str, shard_rows: int) -> Layout:
    """A column-parallel tensor (rows split over TP)."""
    return Layout((hf,), "rows", ((0, shard_rows, 0),))


def gated(gate: str, up: str, shard_rows: int) -> Layout:
    """``[gate rows; up rows]`` of this rank, fused in one shard."""
    half = shard_rows // 2
    return Layout((gate, up), "rows", ((0, half, 0), (1, half, 0)))


def blocks(layout: Layout, shard_rows: int, rank: int) -> list[Block]:
    """The blocks of TP rank ``rank``'s shard (of ``shard_rows`` rows), in shard order."""
    if layout.split != "rows":
        return [Block(0, shard_rows, 0, 0)]
    unit = sum(rows for _, rows, _ in layout.parts)
    out, start = [], 0
    for u in range(shard_rows // unit):
        for hf, rows, base in layout.parts:
            out.append(Block(start, start + rows, hf, base + (rank * (shard_rows // unit) + u) * rows))
            start += rows
    return out


def hf_shapes(layout: Layout, shard_shape: torch.Size, tp: int) -> list[tuple[int, ...]]:
    """The full shapes of ``layout.hf`` for a TP shard of ``shard_shape``."""
    rows = [0] * len(layout.hf)
    for b in blocks(layout, shard_shape[0], tp - 1 if layout.split == "rows" else 0):
        rows[b.hf] = max(rows[b.hf], b.hf_row + b.stop - b.start)
    trailing = tuple(shard_shape[1:])
    if layout.split == "columns":
        trailing = (trailing[0] * tp, *trailing[1:])
    if layout.row_shape is not None:
        assert math.prod(layout.row_shape) == math.prod(trailing), (layout, shard_shape)
        trailing = layout.row_shape
    return [(r, *trailing) for r in rows]


def specs(params: Mapping[str, torch.Tensor], layouts: Mapping[str, Layout]) -> list[TensorSpec]:
    """The HF tensors of ``params`` (parameter name -> TP shard), in ``layouts`` order."""
    tp = ps.get_tensor_model_parallel_world_size()
    out = []
    for name, layout in layouts.items():
        shapes = hf_shapes(layout, params[name].shape, tp)
        out += [
            TensorSpec(hf, params[name].dtype, shape) for hf, shape in zip(layout.hf, shapes, strict=True)
        ]
    return out


def pieces(
    params: Mapping[str, torch.Tensor], layouts: Mapping[str, Layout], buffer_bytes: int, to_first: bool
) -> Iterator[Piece]:
    """The HF rows of ``params``, gathered over TP ``buffer_bytes`` at a time: the shard's rows in chunks
    whose gather from every TP rank and whose assembled HF rows fit in half of ``buffer_bytes`` together
    (at least one row): a chunk is gathered while the previous one's pieces are still referenced (by this
    generator's locals and its consumer's loop variable), so two are in flight. ``to_first``: only TP
    rank 0 gets pieces, else every rank. A TP collective."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for name, layout in layouts.items():
        shard = params[name].detach()
        shapes = hf_shapes(layout, shard.shape, tp)
        rank_blocks = [blocks(layout, len(shard), r) for r in range(tp if layout.split == "rows" else 1)]
        step = max(1, buffer_bytes // (4 * tp * shard[:1].numel() * shard.element_size()))
        for start in range(0, len(shard), step):
            chunk = shard[start : start + step]
            if layout.split == "none":
                gathered = [chunk] if rank == 0 or not to_first else None
            else:
                gathered = tp_gather(chunk, to_first)
            if gathered is None:
                continue
            if layout.split == "columns":
                gathered = [torch.cat(gathered, dim=1)]
            for held, owned in zip(gathered, rank_blocks, strict=True):
                for b in owned:
                    lo, hi = max(b.start, start), min(b.stop, start + len(chunk))
                    if lo < hi:
                        rows = held[lo - start : hi - start].reshape(hi - lo, *shapes[b.hf][1:])
                        yield Piece(layout.hf[b.hf], b.hf_row + lo - b.start, rows)


@torch.no_grad()
def load(
    params: Mapping[str, torch.Tensor], layouts: Mapping[str, Layout], sources: Mapping[str, list]
) -> None:
    """Copy into each TP shard of ``params`` only its rows (and columns) of the HF tensors
    ``sources[name]`` (tensors or lazy slices: ``.shape`` and ``[rows]`` / ``[rows, columns]``), in the
    order of ``layout.hf``. ``ValueError`` names a source of the wrong shape."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for name, layout in layouts.items():
        shard = params[name]
        expected = hf_shapes(layout, shard.shape, tp)
        found = [tuple(s.shape) for s in sources[name]]
        if found != expected:
            raise ValueError(
                f"HF tensors {list(layout.hf)} of shapes {found} do not fit {name} (TP shard "
                f"{tuple(shard.shape)}; expected {expected})"
            )
        width = shard.shape[1] if layout.split == "columns" else None
        for b in blocks(layout, len(shard), rank if layout.split == "rows" else 0):
            rows = slice(b.hf_row, b.hf_row + b.stop - b.start)
            source = sources[name][b.hf]
            part = source[rows] if width is None else source[rows, rank * width : (rank + 1) * width]
            shard[b.start : b.stop].copy_(part.reshape(b.stop - b.start, *shard.shape[1:]))
