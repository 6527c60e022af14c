"""The weights a vLLM engine's servers should hold: their version, and the syncs that bring servers to it.

**Versions.** The ``n``-th sync of a run is version ``<run tag>-<n>``, which a server reports after loading
it (``GET /weight_info``). The run tag is random and shared by every rank (rank 0's, at the first sync): a
server that outlived an earlier run, or serves another trainer, never passes for holding this run's
weights.

**Sync.** ``weight_sync: directory`` (portable): global rank 0 writes the exported HF tensors bucket by
bucket as a safetensors directory under ``sync_dir`` (which the servers must see: shared storage), renamed
into place once complete (``vllm_sync``), then asks each server to reload from it through vLLM's dev-mode
endpoints (``VLLM_SERVER_DEV_MODE=1``): ``POST /collective_rpc`` with ``reload_weights(weights_path=...)``.
``weight_sync: broadcast`` (fast path, no file): the buckets go straight from rank 0 into the servers'
workers over a process group per server (NCCL on GPUs, gloo on CPUs) through vLLM's weight-transfer
endpoints and the ``megatron_papo`` engine of ``vllm_plugin``; see ``vllm_broadcast``. Either way the
server then drops the caches of the old weights and reports the new version (``VllmServer.commit``).
A server that is down during a sync gets the weights before it is used again (``refresh``): from the
directory, or (broadcast) at the next sync, staying out of use until then.

**Every rank agrees.** Only global rank 0 syncs, but every rank sends rollout requests. After each sync
rank 0 shares the directory it wrote and the servers that hold the new weights: on every rank the others
are out of use (a server restarted between syncs must not serve the base checkpoint under this run's
version), and any rank reviving one reloads it from that directory. A reload never goes out without a
directory: ``weights_path`` None would reload the checkpoint the server started from.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_papo.rollout.vllm_broadcast import BroadcastSync
from megatron_papo.rollout.vllm_http import ServerError, VllmServer
from megatron_papo.rollout.vllm_sync import checkpoint_tensors, write_weight_directory

if TYPE_CHECKING:
    from megatron_papo.rollout.vllm import VllmConfig

NamedTensors = Iterable[tuple[str, torch.Tensor]]
Servers = list[VllmServer]
Start = Callable[[], None]  # waits (bounded) for the servers
Stats = dict[str, float]


class ServerWeights:
    """The synced weights of one engine: ``number`` of syncs so far, ``path`` of the latest directory sync,
    ``broadcast`` (the groups of broadcast sync; None for directory sync). ``hf_path``: the checkpoint the
    servers were started from (the names a sync must cover); ``tied``: tied embeddings."""

    def __init__(self, cfg: VllmConfig, hf_path: str, tied: bool) -> None:
        self.cfg = cfg
        self.hf_path = hf_path
        self.tied = tied
        self.number = 0
        self.path: str | None = None
        self.run_tag = uuid.uuid4().hex[:12]
        self.broadcast = (
            BroadcastSync(
                cfg.sync_backend, cfg.sync_host, cfg.sync_timeout_s, cfg.request_timeout_s, cfg.sync_token
            )
            if cfg.weight_sync == "broadcast"
            else None
        )

    @property
    def version(self) -> str:
        """The version string of the latest synced weights, as servers report it."""
        return f"{self.run_tag}-{self.number}"

    def refresh(self, server: VllmServer) -> None:
        """Give ``server`` the latest synced weights (nothing when it already holds them). After a
        broadcast sync it missed, a server stays out of use (``ServerError``) until the next sync."""
        if self.number == 0:
            return
        info = server.request("GET", "/weight_info", None, self.cfg.health_timeout_s)
        try:
            if json.loads(info)["weight_version"] == self.version:
                return
        except (ValueError, KeyError, TypeError) as e:
            raise ServerError(server.url, f"malformed /weight_info answer: {info[:200]!r}") from e
        if self.broadcast is not None:
            raise ServerError(server.url, f"missed the broadcast of {self.version}; rejoins at the next sync")
        if self.path is None:
            raise ServerError(server.url, f"holds no {self.version} and no weights directory is known here")
        timeout = self.cfg.request_timeout_s
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": self.path}, "timeout": timeout}
        server.post_json("/collective_rpc", rpc, timeout)
        server.commit(self.version, timeout)

    def sync(self, named_tensors: NamedTensors, servers: Servers, start: Start) -> Stats:
        """Send the weights (global rank 0) to every up server of ``servers``, by directory or broadcast,
        ``start`` (waiting for the servers) called first; a collective when ``torch.distributed`` is
        initialised (every rank iterates ``named_tensors``, then takes rank 0's outcome: ``share``).
        Returns rank 0's ``sync/*`` figures (other ranks: none, as metrics are averaged over the ranks
        reporting them)."""
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if dist.is_initialized() and self.number == 0:
            tag = [self.run_tag]
            dist.broadcast_object_list(tag, src=0)
            self.run_tag = tag[0]
        self.number += 1
        stats: Stats = {}
        if not rank0:
            for _ in named_tensors:  # take part in the export's gathers
                pass
        elif self.broadcast is not None:
            stats = self._broadcast_sync(named_tensors, servers, start)
        else:
            stats = self._directory_sync(named_tensors, servers, start)
        if dist.is_initialized():
            self.share(servers)
        return stats

    def share(self, servers: Servers) -> None:
        """Rank 0's outcome of a sync on every rank: the directory it wrote, and which of ``servers`` hold
        the new weights (up); the others are marked down (revived with the directory, or rejoining at the
        next broadcast)."""
        outcome = [self.path, [s.url for s in servers if not s.down]]
        dist.broadcast_object_list(outcome, src=0)
        self.path, current = outcome[0], set(outcome[1])
        for server in servers:
            if server.url in current:
                server.mark_up()
            elif not server.down:
                server.mark_down(f"missed the sync of {self.version} (on trainer rank 0)")

    def _directory_sync(self, named_tensors: NamedTensors, servers: Servers, start: Start) -> Stats:
        previous = self.path
        self.path = os.path.join(os.path.abspath(self.cfg.sync_dir), f"v{self.number}")
        nbytes = write_weight_directory(
            named_tensors, self.path, self.hf_path, self.tied, self.cfg.bucket_bytes
        )
        start()
        synced = 0
        for server in servers:
            if server.down:
                continue  # reloaded when it is revived
            try:
                self.refresh(server)
                synced += 1
            except ServerError as e:
                if not e.retryable:  # the reload itself is refused (a 4xx: a wrong token)
                    raise
                server.mark_down(str(e))
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return {"sync/bytes": float(nbytes), "sync/servers": float(synced)}

    def _broadcast_sync(self, named_tensors: NamedTensors, servers: Servers, start: Start) -> Stats:
        assert self.broadcast is not None
        start()
        # a down server that answers again rejoins now: it gets these weights with the others
        targets = [s for s in servers if not s.down or s.healthy(self.cfg.health_timeout_s)]
        pairs = checkpoint_tensors(named_tensors, self.hf_path, self.tied)
        live, nbytes = self.broadcast.sync(targets, pairs, self.cfg.bucket_bytes)
        for server in live:
            try:
                server.commit(self.version, self.cfg.request_timeout_s)
                server.mark_up()
            except ServerError as e:
                self.broadcast.drop(server, e)
        synced = sum(not s.down for s in live)
        return {"sync/bytes": float(nbytes), "sync/servers": float(synced)}
