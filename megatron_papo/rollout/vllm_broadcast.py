"""Broadcast weight sync, trainer side: buckets of exported weights sent straight into vLLM servers.

The fast path of ``VllmEngine.sync_weights`` (``rollout.vllm_weight_sync: broadcast``): no file is
written. Global rank 0 opens one group per server (``weight_group``: itself and the server's workers,
NCCL between GPUs, gloo on CPUs) and drives vLLM's weight-transfer endpoints, whose server side is the
``megatron_papo`` engine of ``vllm_plugin``:

    join (once per server):  POST /init_weight_transfer_engine   beside  open_group(rank 0)
                             POST /finish_weight_update (closes an update a dead trainer left open)
    each sync:               POST /start_weight_update
                             per bucket: POST /update_weights {nbytes, tensors}  beside  broadcast(bucket)
                             POST /finish_weight_update, then the caches reset and the version set

Each HTTP call runs beside the collective it meets; whichever fails first is raised at once, so a server
that rejects a call or dies mid-broadcast costs no timeout: it is marked down, its group dropped, and the
other servers carry on. A server that missed a sync rejoins (a fresh group) at the next one.

The init and each update carry the run's token (``sync_auth``), which the server's engine checks. The
group's store listens on the address the servers are given (``master_address``) only, on a port taken
by binding it there (no other interface, no race for a free port).
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any
from urllib.parse import urlparse

import torch

from megatron_papo.models.buckets import buckets
from megatron_papo.rollout.vllm_http import ServerError, VllmServer
from megatron_papo.rollout.weight_group import BACKEND, WeightGroup, open_group, pack


def local_address_towards(url: str) -> str:
    """This machine's address on the route to the server at ``url`` (where the server can reach us)."""
    parsed = urlparse(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((parsed.hostname, parsed.port or 80))  # UDP: no packet is sent
        return s.getsockname()[0]


def listen_on(host: str) -> socket.socket:
    """A TCP socket listening on ``host`` (that address only) at a port of the system's choosing."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.bind((host, 0))
    listener.listen()
    return listener


def beside(request: Callable[[], Any], collective: Callable[[], Any]) -> None:
    """Run a server's HTTP ``request`` and this side of the ``collective`` it meets, concurrently; the
    first failure of either is raised without waiting for the other (both are bounded by timeouts, and
    a collective left waiting for a failed peer ends with its group, which the caller drops)."""
    done: queue.Queue[BaseException | None] = queue.Queue()

    def run(fn: Callable[[], Any]) -> None:
        try:
            fn()
            done.put(None)
        except BaseException as e:  # handed to the caller
            done.put(e)

    for fn in (request, collective):
        threading.Thread(target=run, args=(fn,), daemon=True).start()
    for _ in range(2):
        error = done.get()
        if error is not None:
            raise error


class BroadcastSync:
    """The weight-sync groups of one trainer (global rank 0) with its servers, by server URL.

    ``backend``: gloo or nccl (None: nccl when CUDA is available). ``host``: the address servers reach
    the trainer at (None: this machine's address on the route to each server). ``token``: the run's
    weight-sync token, in every init and update.
    """

    def __init__(
        self,
        backend: str | None,
        host: str | None,
        timeout_s: float,
        request_timeout_s: float,
        token: str | None,
    ) -> None:
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else None
        self.host = host
        self.timeout_s = timeout_s
        self.request_timeout_s = request_timeout_s
        self.token = token or ""
        self.groups: dict[str, WeightGroup] = {}

    def workers(self, server: VllmServer) -> int:
        """The server's worker count (tensor x pipeline x data parallel), from ``/server_info``; the server
        must run the ``megatron_papo`` weight-transfer engine."""
        raw = server.request("GET", "/server_info?config_format=json", None, self.request_timeout_s)
        try:
            config = json.loads(raw)["vllm_config"]
            transfer = config.get("weight_transfer_config") or {}
            parallel = config["parallel_config"]
            sizes = [int(parallel[k]) for k in ("tensor_parallel_size", "pipeline_parallel_size")]
            sizes.append(int(parallel.get("data_parallel_size_local") or parallel["data_parallel_size"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ServerError(server.url, f"malformed /server_info answer: {raw[:200]!r}") from e
        if transfer.get("backend") != BACKEND:
            raise ServerError(
                server.url,
                f"weight transfer backend is {transfer.get('backend')!r}, not {BACKEND!r}: start it with "
                "tools/launch_vllm.sh --weight-sync broadcast (megatron-papo installed in its environment)",
                retryable=False,
            )
        return sizes[0] * sizes[1] * sizes[2]

    def join(self, server: VllmServer) -> None:
        """Open a fresh group with ``server``'s workers (replacing any earlier one)."""
        self.groups.pop(server.url, None)
        world_size = 1 + self.workers(server)
        host = self.host or local_address_towards(server.url)
        listener = listen_on(host)
        port = listener.getsockname()[1]
        init = {
            "master_address": host,
            "master_port": port,
            "world_size": world_size,
            "rank_offset": 1,
            "backend": self.backend,
            "timeout_s": self.timeout_s,
            "token": self.token,
        }
        opened: list[WeightGroup] = []
        beside(
            lambda: server.post_json("/init_weight_transfer_engine", {"init_info": init}, self.timeout_s),
            lambda: opened.append(
                open_group(host, port, 0, world_size, self.backend, self.timeout_s, listener.detach())
            ),
        )
        self.groups[server.url] = opened[0]
        # an update that an earlier trainer left open (it died between buckets) must be finished before
        # vLLM starts another; with none open vLLM answers an error, which says nothing here
        with contextlib.suppress(ServerError):
            server.post_json("/finish_weight_update", {}, self.request_timeout_s)

    def ensure_joined(self, server: VllmServer) -> None:
        """Join ``server`` unless its group is current: a server that was down rejoins with a fresh group
        (it may be a restarted process)."""
        if server.down or server.url not in self.groups:
            self.join(server)

    def sync(
        self, servers: list[VllmServer], pairs: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
    ) -> tuple[list[VllmServer], int]:
        """Send ``pairs`` (checkpoint name, tensor) to every server of ``servers`` in buckets of at most
        ``bucket_bytes`` (``megatron_papo.models.buckets``); returns the servers that received all of them
        (not yet committed: see ``VllmServer.commit``) and the bytes sent. A server that fails is marked
        down and left out; one that cannot take part at all (no ``megatron_papo`` engine, a 4xx answer)
        raises its ``ServerError`` (see ``each``).
        """
        timeout = self.request_timeout_s
        live = self.each(servers, self.ensure_joined)  # every group first: a misconfigured server fails
        # the sync before any update starts
        live = self.each(live, lambda s: s.post_json("/start_weight_update", {}, timeout))
        nbytes = 0
        for bucket in buckets(pairs, bucket_bytes):  # consumed whatever happens: it is a collective
            if not live:
                continue
            buffer, metas = pack(bucket, self.device or torch.device("cpu"))
            nbytes += buffer.numel()
            update = {"update_info": {"nbytes": buffer.numel(), "tensors": metas, "token": self.token}}
            live = self.each(live, partial(self.send, buffer=buffer, update=update))
        live = self.each(live, lambda s: s.post_json("/finish_weight_update", {}, timeout))
        return live, nbytes

    def each(self, servers: list[VllmServer], call: Callable[[VllmServer], Any]) -> list[VllmServer]:
        """The servers of ``servers`` for which ``call(server)`` succeeds; the others are dropped, except
        that a non-retryable ``ServerError`` (the server cannot take part at all) is raised."""
        kept = []
        for server in servers:
            try:
                call(server)
                kept.append(server)
            except ServerError as e:
                if not e.retryable:
                    raise
                self.drop(server, e)
            except RuntimeError as e:  # the collective: a peer gone, a timeout
                self.drop(server, e)
        return kept

    def send(self, server: VllmServer, buffer: torch.Tensor, update: dict) -> None:
        """One bucket into ``server``: its ``/update_weights`` call beside the broadcast of ``buffer``."""
        group = self.groups[server.url]
        beside(
            lambda: server.post_json("/update_weights", update, self.request_timeout_s),
            lambda: group.broadcast(buffer),
        )

    def drop(self, server: VllmServer, error: BaseException) -> None:
        """Mark ``server`` down and forget its group (it rejoins with a fresh one)."""
        self.groups.pop(server.url, None)
        message = str(error) if isinstance(error, ServerError) else f"weight broadcast failed: {error}"
        server.mark_down(message)
