"""The vLLM servers of one engine: which one takes the next request, which are down, when a down one is
tried again.

Requests go to the up server with the fewest requests in flight, preferring servers the request has not
been tried on yet. A failed, timed-out or malformed answer marks that server down (``failed``); a down
server is probed (``/health``) again after ``retry_down_after_s`` and, if healthy, brought up to date by
``refresh`` (the engine's weights: ``vllm_weights.ServerWeights.refresh``) before it is used again. One
server's HTTP calls, health and liveness are ``vllm_http.VllmServer``'s.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

from megatron_papo.rollout.vllm_http import ServerError, VllmServer, wait_until_healthy


class ServerPool:
    """The servers at ``urls`` (``token``: the run's weight-sync token); ``retries``: answers that failed
    over to another server (reset by the engine per rollout)."""

    def __init__(
        self,
        urls: list[str],
        health_timeout_s: float,
        retry_down_after_s: float,
        refresh: Callable[[VllmServer], None],
        token: str | None = None,
    ) -> None:
        self.servers = [VllmServer(url, token) for url in urls]
        self.health_timeout_s = health_timeout_s
        self.retry_down_after_s = retry_down_after_s
        self.refresh = refresh
        self.retries = 0
        self._lock = threading.Lock()

    def start(self, startup_timeout_s: float) -> str:
        """Wait (bounded) for every server; return the served model name (the first one listed)."""
        wait_until_healthy(self.servers, startup_timeout_s)
        server = self.servers[0]
        raw = server.request("GET", "/v1/models", None, self.health_timeout_s)
        try:
            return json.loads(raw)["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ServerError(server.url, f"malformed /v1/models answer: {raw[:200]!r}") from e

    def _revive(self, server: VllmServer) -> bool:
        """A down server whose wait is over: back in use if healthy and (re)loaded with current weights."""
        if time.monotonic() - server.down_since < self.retry_down_after_s:
            return False
        if not server.healthy(self.health_timeout_s):
            server.mark_down(server.last_error)
            return False
        try:
            self.refresh(server)
        except ServerError as e:
            server.mark_down(str(e))
            return False
        server.mark_up()
        return True

    def acquire(self, tried: set[str]) -> VllmServer | None:
        """The least-loaded up server, preferring those not ``tried`` yet; None if none is up."""
        with self._lock:
            for server in self.servers:
                if server.down:
                    self._revive(server)
            up = [s for s in self.servers if not s.down]
            fresh = [s for s in up if s.url not in tried]
            if not (fresh or up):
                return None
            server = min(fresh or up, key=lambda s: s.in_flight)
            server.in_flight += 1
            return server

    def release(self, server: VllmServer) -> None:
        with self._lock:
            server.in_flight -= 1

    def failed(self, server: VllmServer, error: str) -> None:
        """``server`` failed a request that moves on to another one: down, and one more retry."""
        server.mark_down(error)
        with self._lock:
            self.retries += 1

    def up_count(self) -> int:
        return sum(not s.down for s in self.servers)

    def down_report(self) -> str:
        """The down servers and their last errors (empty when all are up)."""
        return "; ".join(f"{s.url}: {s.last_error}" for s in self.servers if s.down)
