"""One vLLM OpenAI-compatible server seen from the trainer: JSON over HTTP, health, load and liveness.

Only the standard library is used (``urllib``), so the trainer needs no HTTP client package. Every call
is bounded by a timeout; every failure becomes a ``ServerError`` that names the server, and says whether
another server may succeed where this one failed (``retryable``: connection refused or reset, timeout,
5xx, malformed answer) or not (a 4xx: the request itself is wrong, or the run's token is not the
server's). Every request carries the run's weight-sync token (``sync_auth``) when one is given.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from megatron_papo.rollout.sync_auth import HEADER


class ServerError(RuntimeError):
    """A failed call to the server at ``url``."""

    def __init__(self, url: str, message: str, retryable: bool = True) -> None:
        super().__init__(f"vLLM server {url}: {message}")
        self.url = url
        self.retryable = retryable


class VllmServer:
    """Client state of one server: ``in_flight`` requests, and whether it is ``down`` (and since when).
    ``token``: the run's weight-sync token, sent with every request (None: not sent)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Content-Type": "application/json"} | ({HEADER: token} if token else {})
        self.in_flight = 0
        self.down_since: float | None = None
        self.last_error = ""
        self.lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def mark_down(self, error: str) -> None:
        """Out of use from now on (the engine probes it again after a while)."""
        with self.lock:
            self.down_since = time.monotonic()
            self.last_error = error

    def mark_up(self) -> None:
        with self.lock:
            self.down_since = None

    def request(self, method: str, path: str, body: Any, timeout: float) -> bytes:
        """The raw answer body of ``method path`` (JSON ``body`` if not None); non-2xx raises."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode(errors="replace")
            raise ServerError(
                self.url, f"{method} {path} answered HTTP {e.code}: {detail}", retryable=e.code >= 500
            ) from e
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise ServerError(self.url, f"{method} {path} failed: {type(e).__name__}: {reason}") from e

    def post_json(self, path: str, body: dict, timeout: float) -> dict:
        """POST ``body`` and parse the answer as a JSON object (anything else is a malformed answer)."""
        raw = self.request("POST", path, body, timeout)
        if not raw:
            return {}
        try:
            out = json.loads(raw)
        except ValueError as e:
            raise ServerError(self.url, f"POST {path}: malformed answer (not JSON): {raw[:200]!r}") from e
        if not isinstance(out, dict):
            raise ServerError(self.url, f"POST {path}: malformed answer (not a JSON object): {raw[:200]!r}")
        return out

    def commit(self, version: str, timeout: float) -> None:
        """After new weights are loaded: drop the caches of the old ones (image embeddings, KV, and the
        scheduler's view of the worker's caches, which a reload clears) and report ``version``."""
        for cache in ("/reset_mm_cache", "/reset_encoder_cache", "/reset_prefix_cache"):
            self.post_json(cache, {}, timeout)
        self.post_json("/update_weight_version", {"new_version": version}, timeout)

    def healthy(self, timeout: float) -> bool:
        """Whether ``GET /health`` answers 200 within ``timeout`` seconds (``last_error`` says why not)."""
        try:
            self.request("GET", "/health", None, timeout)
            return True
        except ServerError as e:
            self.last_error = str(e)
            return False


def wait_until_healthy(servers: list[VllmServer], timeout: float, poll: float = 1.0) -> None:
    """Block until every server answers ``/health``; after ``timeout`` seconds raise ``TimeoutError``
    naming the servers that never came up and their last error."""
    deadline = time.monotonic() + timeout
    waiting = list(servers)
    while True:
        waiting = [s for s in waiting if not s.healthy(timeout=min(5.0, timeout))]
        if not waiting:
            return
        if time.monotonic() >= deadline:
            names = "; ".join(f"{s.url} ({s.last_error})" for s in waiting)
            raise TimeoutError(f"vLLM servers not up after {timeout:.0f} s: {names}")
        time.sleep(poll)
