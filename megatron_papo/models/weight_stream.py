"""Exported weights as a stream of row pieces, and its transport between pipeline stages.

An export never holds the model: each stage turns its TP shards into ``Piece``s (rows of one HF tensor,
at most a buffer's bytes, ``weights.stage_pieces``), and the pieces go where they are consumed:

- ``to="rank0"``: to global rank 0 only (the writer of an HF directory or a vLLM sync). TP ranks gather
  each piece to TP rank 0 of data-parallel replica 0, which sends it to rank 0 point to point; the other
  replicas take no part.
- ``to="all"``: to every rank (the embedded rollout engines, tests): TP all-gathers, then each pipeline
  stage broadcasts its pieces within its pipeline group.

Between stages only plain tensor collectives move: first each stage's ``TensorSpec`` list (a JSON
message in a uint8 tensor), then per piece an int64 header ``[spec index, first row, rows]`` and the
piece itself; a header with index -1 ends the stage. The receiver thus knows every tensor's name, dtype
and shape before the first byte arrives (the safetensors writer lays out its files from that).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_papo.parallel.device import current_device
from megatron_papo.parallel.host_memory import trimmed

DESTINATIONS = ("rank0", "all")
BUFFER_BYTES = 256 << 20  # default bound of an export's tensor data in flight on any rank


@dataclass(frozen=True)
class TensorSpec:
    """One exported tensor: its name, dtype and full shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        """The bytes of one of its ``shape[0]`` rows."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.shape[0]


@dataclass(frozen=True)
class Piece:
    """Rows ``[row, row + len(tensor))`` of the tensor ``name``: ``tensor`` [rows, *shape[1:]]. It may be a
    view of a parameter: consume (write or copy) it before the next piece is drawn."""

    name: str
    row: int
    tensor: torch.Tensor


class WeightStream:
    """The receiving rank's view of one export: ``specs`` (every tensor of the model, in stream order) and
    ``pieces``. Iterating gives (name, full CPU tensor) pairs, each as soon as its rows are all in. On a
    rank that receives nothing both are empty, but it must still iterate to the end (a collective)."""

    def __init__(self, specs: list[TensorSpec], pieces: Iterator[Piece]) -> None:
        self.specs = specs
        self.pieces = pieces

    @classmethod
    def of(cls, pairs) -> WeightStream:
        """A stream of whole in-memory (name, tensor) pairs."""
        pairs = list(pairs)
        specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in pairs]
        return cls(specs, (Piece(n, 0, t.reshape(-1, *t.shape[1:])) for n, t in pairs))

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        shapes = {s.name: s.shape for s in self.specs}
        partial: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (tensor being filled, rows still due)
        for piece in self.pieces:
            shape = shapes[piece.name]
            rows = len(piece.tensor)
            if piece.name not in partial and rows == shape[0]:
                yield piece.name, piece.tensor.detach().to("cpu", copy=True).reshape(shape)
                continue
            full, due = partial.get(piece.name) or (torch.empty(shape, dtype=piece.tensor.dtype), shape[0])
            full[piece.row : piece.row + rows].copy_(piece.tensor)
            partial[piece.name] = (full, due - rows)
            if due == rows:
                del partial[piece.name]
                yield piece.name, full


def _roles(to: str) -> list[str]:
    """This rank's part in each stage's transfer: ``send`` (its pieces), ``recv``, ``local`` (its own
    pieces, kept) or ``none``."""
    pp, me = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    if to == "all":
        return ["send" if s == me else "recv" for s in range(pp)]
    if dist.get_rank() == 0:
        return ["local" if s == 0 else "recv" for s in range(pp)]
    on_path = _pp_group_ranks()[0] == 0  # TP rank 0 of rank 0's replica
    return ["send" if s == me and on_path else "none" for s in range(pp)]


def _pp_group_ranks() -> list[int]:
    group = ps.get_pipeline_model_parallel_group()
    return [dist.get_global_rank(group, s) for s in range(ps.get_pipeline_model_parallel_world_size())]


def relay(specs: list[TensorSpec], pieces: Iterator[Piece], to: str) -> WeightStream:
    """This stage's ``specs`` and ``pieces`` (held by the ranks that receive TP gathers) -> the stream of
    the whole model on the ranks of ``to``. Every rank must iterate the result to the end."""
    if to not in DESTINATIONS:
        raise ValueError(f"export destination {to!r} is not one of {DESTINATIONS}")
    if to == "rank0":  # an export: the buffer bounds what is alive, the allocator must not keep the rest
        pieces = trimmed(pieces)  # ("all" rebuilds the whole model on every rank: no bound, no trim per step)
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return WeightStream(specs if to == "all" or dist.get_rank() == 0 else [], pieces)
    ranks, roles = _pp_group_ranks(), _roles(to)
    group = ps.get_pipeline_model_parallel_group()
    links = []
    for stage, role in enumerate(roles):
        if to == "all":
            links.append(lambda t, src=ranks[stage]: dist.broadcast(t, src, group=group))
        elif role == "send":
            links.append(lambda t: dist.send(t, 0))
        else:
            links.append(lambda t, src=ranks[stage]: dist.recv(t, src))
    stage_specs = []
    for stage, role in enumerate(roles):
        if role in ("send", "recv"):
            stage_specs.append(_move_specs(specs if role == "send" else None, links[stage]))
        else:
            stage_specs.append(specs if role == "local" else [])
    receiving = to == "all" or dist.get_rank() == 0
    all_specs = [spec for stage in stage_specs for spec in stage] if receiving else []
    return WeightStream(all_specs, _relay_pieces(stage_specs, pieces, roles, links, to == "all"))


def _move_specs(specs: list[TensorSpec] | None, move: Callable[[torch.Tensor], None]) -> list[TensorSpec]:
    """One stage's specs from its sender (``specs`` given) to the receivers (``specs`` None)."""
    device = current_device()
    size = torch.zeros(1, dtype=torch.int64, device=device)
    if specs is not None:
        message = json.dumps([[s.name, str(s.dtype).removeprefix("torch."), s.shape] for s in specs])
        payload = torch.frombuffer(bytearray(message.encode()), dtype=torch.uint8).to(device)
        size[0] = payload.numel()
    move(size)
    if specs is None:
        payload = torch.empty(int(size[0]), dtype=torch.uint8, device=device)
    move(payload)
    if specs is not None:
        return specs
    message = json.loads(payload.cpu().numpy().tobytes())
    return [TensorSpec(n, getattr(torch, d), tuple(s)) for n, d, s in message]


def _relay_pieces(
    stage_specs: list[list[TensorSpec]],
    pieces: Iterator[Piece],
    roles: list[str],
    links: list[Callable[[torch.Tensor], None]],
    sender_keeps: bool,
) -> Iterator[Piece]:
    """The pieces of every stage, in stage order, on the receivers; the senders' pieces also stay on
    them when ``sender_keeps``. Drains ``pieces`` (this stage's TP gathers) whatever this rank's role."""
    device = current_device()
    for stage, (specs, role, move) in enumerate(zip(stage_specs, roles, links, strict=True)):
        if role in ("local", "send", "none") and stage == ps.get_pipeline_model_parallel_rank():
            index = {s.name: i for i, s in enumerate(specs)}
            for piece in pieces:
                if role == "send":
                    move(torch.tensor([index[piece.name], piece.row, len(piece.tensor)], device=device))
                    move(piece.tensor.contiguous())
                if role == "local" or (role == "send" and sender_keeps):
                    yield piece
            if role == "send":
                move(torch.tensor([-1, 0, 0], device=device))
        elif role == "recv":
            while True:
                header = torch.empty(3, dtype=torch.int64, device=device)
                move(header)
                i, row, rows = header.tolist()
                if i < 0:
                    break
                tensor = torch.empty((rows, *specs[i].shape[1:]), dtype=specs[i].dtype, device=device)
                move(tensor)
                yield Piece(specs[i].name, row, tensor)
