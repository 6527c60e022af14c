"""The process group that carries weights from the trainer to one vLLM server, and the bucket format.

Broadcast weight sync (``vllm.weight_sync: broadcast``) joins the trainer's sending rank (rank 0) and the
``W`` workers of one server (ranks ``1..W``) in a group of their own: a ``TCPStore`` whose master is the
trainer, and a gloo (CPU) or NCCL (GPU) backend. Nothing global of ``torch.distributed`` is touched on
either side, so the group lives beside megatron-core's groups in the trainer and beside vLLM's in the
server. The trainer builds it here, the server's workers through ``megatron_papo.rollout.vllm_plugin``:
one function, so the two sides cannot disagree on the rendezvous.

A bucket is one flat ``uint8`` buffer holding several tensors, each at a 16-byte aligned offset, and a
list of ``TensorMeta`` dicts (name, dtype, shape, offset) that travels beside it over HTTP. One
broadcast per bucket, whatever the number of tensors in it.

This module imports torch only: the vLLM server's environment has no megatron-core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import TypedDict

import torch
from torch.distributed import PrefixStore, ProcessGroup, TCPStore

BACKEND = "megatron_papo"  # the name of the vLLM weight-transfer engine (vllm_plugin) that joins the group
ALIGN = 16  # bytes: every tensor in a bucket starts at a multiple, so a uint8 slice views as any dtype
STORE_PREFIX = "megatron_papo/weight_sync"


class TensorMeta(TypedDict):
    """Where one tensor sits in a bucket: ``offset`` bytes in, ``dtype`` a torch dtype name."""

    name: str
    dtype: str
    shape: list[int]
    offset: int


@dataclass
class WeightGroup:
    """One trainer-to-server group: the backend ``group`` and the ``store`` it met through (rank 0 serves
    the store, so it must live as long as the group)."""

    group: ProcessGroup
    store: TCPStore

    def broadcast(self, buffer: torch.Tensor) -> None:
        """Broadcast ``buffer`` from rank 0 (group-local ranks), returning once it is complete here: gloo's
        ``wait`` blocks on the transfer, NCCL's only orders the current stream, which is then synchronised.
        A peer that is gone raises (``RuntimeError`` / ``DistBackendError``)."""
        options = torch.distributed.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([buffer], options).wait()
        if buffer.is_cuda:
            torch.cuda.current_stream(buffer.device).synchronize()


def open_group(
    host: str,
    port: int,
    rank: int,
    world_size: int,
    backend: str,
    timeout_s: float,
    listen_fd: int | None = None,
) -> WeightGroup:
    """Join the weight-sync group at ``host:port`` as ``rank`` of ``world_size``; rank 0 (the trainer)
    hosts the store, on the listening socket ``listen_fd`` when given (bound to ``host`` only; the store
    takes it over), else on every interface. Blocks until every rank has joined; after ``timeout_s``
    raises (torch's ``DistStoreError``/``RuntimeError``)."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight-sync group backend must be 'gloo' or 'nccl', got {backend!r}")
    timeout = timedelta(seconds=timeout_s)
    store = TCPStore(
        host,
        port,
        world_size,
        is_master=rank == 0,
        timeout=timeout,
        wait_for_workers=False,
        master_listen_fd=listen_fd,
    )
    prefix = PrefixStore(STORE_PREFIX, store)
    group = ProcessGroup(prefix, rank, world_size)
    if backend == "gloo":
        impl = torch.distributed.ProcessGroupGloo(prefix, rank, world_size, timeout)
        kind, device = ProcessGroup.BackendType.GLOO, torch.device("cpu")
    else:
        options = torch.distributed.ProcessGroupNCCL.Options()
        options._timeout = timeout
        impl = torch.distributed.ProcessGroupNCCL(prefix, rank, world_size, options)
        kind, device = ProcessGroup.BackendType.NCCL, torch.device("cuda")
    group._set_default_backend(kind)
    impl._set_sequence_number_for_group()
    group._register_backend(device, kind, impl)
    return WeightGroup(group, store)


def pack(
    named: list[tuple[str, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, list[TensorMeta]]:
    """``named`` tensors as one bucket: the ``uint8`` buffer [nbytes] on ``device`` and its metadata."""
    metas: list[TensorMeta] = []
    nbytes = 0
    for name, tensor in named:
        metas.append(TensorMeta(name=name, dtype=str(tensor.dtype).removeprefix("torch."),
                                shape=list(tensor.shape), offset=nbytes))  # fmt: skip
        nbytes += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for meta, (_, tensor) in zip(metas, named, strict=True):
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[meta["offset"] : meta["offset"] + flat.numel()].copy_(flat)
    return buffer, metas


def unpack(buffer: torch.Tensor, metas: list[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) views into a received bucket ``buffer`` [nbytes] (no copies)."""
    out = []
    for meta in metas:
        dtype = getattr(torch, meta["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"weight sync: tensor {meta['name']!r} has unknown dtype {meta['dtype']!r}")
        nbytes = math.prod(meta["shape"]) * dtype.itemsize
        if meta["offset"] % ALIGN or meta["offset"] + nbytes > buffer.numel():
            raise ValueError(
                f"weight sync: tensor {meta['name']!r} ({nbytes} bytes at offset {meta['offset']}) does not "
                f"fit the {buffer.numel()}-byte bucket"
            )
        view = buffer[meta["offset"] : meta["offset"] + nbytes].view(dtype).view(meta["shape"])
        out.append((meta["name"], view))
    return out
