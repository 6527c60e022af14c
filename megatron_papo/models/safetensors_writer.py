"""Safetensors files written as their rows arrive: the one writer of every weight export.

All tensors' names, dtypes and shapes are known first (``TensorSpec``s, in order), so each file's header
and layout are fixed before any data: the tensors are grouped into shards of at most ``max_shard_bytes``
(``megatron_papo.models.buckets``; one shard is ``model.safetensors``, more are
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``, as transformers names them),
each file is created at its final size, and every piece of rows is written at its place
(``os.pwrite``) as soon as it comes. Nothing is held but the piece being written, and a piece larger than
``buffer_bytes`` is refused (``BufferError``): the bound of an export's memory is checked, not hoped for.
``close`` checks that every byte was written once.
"""

from __future__ import annotations

import json
import os
import struct

import torch

from megatron_papo.models.buckets import buckets
from megatron_papo.models.weight_stream import TensorSpec
from megatron_papo.models.weights import INDEX, SINGLE

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _header(specs: list[TensorSpec]) -> tuple[bytes, dict[str, int]]:
    """The safetensors header of a file holding ``specs`` in order (length prefix, JSON padded to 8 bytes)
    and each tensor's data offset in the file."""
    entries: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    start = 0
    for s in specs:
        entries[s.name] = {
            "dtype": DTYPE_NAMES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [start, start + s.nbytes],
        }
        start += s.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    header = struct.pack("<Q", len(text)) + text
    offsets, start = {}, len(header)
    for s in specs:
        offsets[s.name] = start
        start += s.nbytes
    return header, offsets


class SafetensorsWriter:
    """Writes the tensors ``specs`` (checkpoint-file names) into ``out_dir`` as pieces of rows arrive.

    Use as a context manager; on an error the files stay incomplete (the caller removes its directory)."""

    def __init__(
        self, out_dir: str, specs: list[TensorSpec], max_shard_bytes: int, buffer_bytes: int
    ) -> None:
        self.buffer_bytes = buffer_bytes
        self.specs = {s.name: s for s in specs}
        if len(self.specs) != len(specs):
            raise ValueError("safetensors writer: a tensor name is given twice")
        meta = ((s.name, torch.empty(s.shape, dtype=s.dtype, device="meta")) for s in specs)
        shards = [[self.specs[name] for name, _ in b] for b in buckets(meta, max_shard_bytes)] or [[]]
        self.files = (
            [SINGLE]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        self.out_dir = out_dir
        self.where: dict[str, tuple[int, int]] = {}  # name -> (fd, data offset)
        self.due = {s.name: s.nbytes for s in specs}
        self.fds: list[int] = []
        for file, shard in zip(self.files, shards, strict=True):
            header, offsets = _header(shard)
            fd = os.open(os.path.join(out_dir, file), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, len(header) + sum(s.nbytes for s in shard))
            self.where |= {s.name: (fd, offsets[s.name]) for s in shard}
        self.weight_map = {
            s.name: file for file, shard in zip(self.files, shards, strict=True) for s in shard
        }

    def write(self, name: str, row: int, rows: torch.Tensor) -> None:
        """Write ``rows`` [n, *shape[1:]] as rows ``[row, row + n)`` of the tensor ``name``."""
        spec = self.specs[name]
        nbytes = rows.numel() * rows.element_size()
        if nbytes > self.buffer_bytes:
            raise BufferError(
                f"{name}: a piece of {nbytes} bytes exceeds the export buffer of {self.buffer_bytes}"
            )
        if (
            rows.dtype != spec.dtype
            or tuple(rows.shape[1:]) != spec.shape[1:]
            or row + len(rows) > spec.shape[0]
        ):
            raise ValueError(
                f"{name}: rows {row}..{row + len(rows)} of {rows.dtype} {tuple(rows.shape)} do not fit "
                f"{spec.dtype} {spec.shape}"
            )
        fd, offset = self.where[name]
        data = memoryview(rows.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        position = offset + row * spec.row_bytes
        while data:
            written = os.pwrite(fd, data, position)
            data, position = data[written:], position + written
        self.due[name] -= nbytes

    def close(self) -> int:
        """Check that every tensor was written whole, write the index (several shards); return the bytes."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        wrong = {n: d for n, d in self.due.items() if d}
        if wrong:
            raise ValueError(
                f"safetensors writer: {len(wrong)} tensors not written whole, e.g. {list(wrong)[:3]}"
            )
        total = sum(s.nbytes for s in self.specs.values())
        if len(self.files) > 1:
            with open(os.path.join(self.out_dir, INDEX), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": self.weight_map}, f, indent=2)
        return total

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
