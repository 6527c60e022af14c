"""The run's weight-sync secret: only the trainer that holds it can change what a vLLM server serves.

A token is made per run (``python -m megatron_papo.rollout.sync_auth`` prints a fresh one; the SLURM job
scripts do this for every job) and handed to the servers and the trainer in the environment variable
``MEGATRON_PAPO_SYNC_TOKEN`` (never on a command line, in a config or a log). Checked twice on a server:

- ``SyncTokenMiddleware`` (tools/launch_vllm.sh adds it with ``--middleware``): every call that is not a
  read (GET) and not the OpenAI API (``/v1/...``) needs header ``X-Weight-Sync-Token`` with the token,
  else HTTP 401: ``/collective_rpc`` (directory sync's reload, and any worker method), the weight-transfer
  engine's ``/init_weight_transfer_engine``, ``/start_weight_update``, ``/update_weights``,
  ``/finish_weight_update``, ``/update_weight_version``, the cache resets, ``/sleep``, ...;
- the ``megatron_papo`` weight-transfer engine (``vllm_plugin``) refuses an init or an update whose info
  lacks the token, before it joins a group or receives a byte.

A server without a token refuses every such call. Dependency-free (no vLLM, starlette or torch): the
middleware is plain ASGI. See docs/security.md.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

ENV = "MEGATRON_PAPO_SYNC_TOKEN"
HEADER = "X-Weight-Sync-Token"
OPEN_PREFIX = "/v1/"  # the OpenAI API: rollouts


def new_token() -> str:
    return secrets.token_urlsafe(32)


def environment_token() -> str | None:
    """The token of this process's environment (None when unset or empty)."""
    return os.environ.get(ENV) or None


def token_matches(given: str | None) -> bool:
    """Whether ``given`` is this server's token (never when the server has none)."""
    expected = environment_token()
    return bool(expected and given) and hmac.compare_digest(given.encode(), expected.encode())


def check_token(given: str | None, what: str) -> None:
    """Raise ``PermissionError`` unless ``given`` is this server's token (``what``: the refused call)."""
    if not token_matches(given):
        reason = "no token configured on this server" if environment_token() is None else "wrong or missing"
        raise PermissionError(f"megatron_papo weight sync: {what} refused: {ENV} token {reason}")


def guarded(method: str, path: str) -> bool:
    """Whether a call needs the token: anything but reads and the OpenAI API."""
    return method not in ("GET", "HEAD", "OPTIONS") and not path.startswith(OPEN_PREFIX)


Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class SyncTokenMiddleware:
    """ASGI middleware of the vLLM server: ``guarded`` calls without the token get HTTP 401."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[dict]], send: Send) -> None:
        if scope["type"] == "http" and guarded(scope["method"], scope["path"]):
            given = dict(scope["headers"]).get(HEADER.lower().encode(), b"").decode(errors="replace")
            if not token_matches(given):
                body = json.dumps({"error": f"{scope['path']} needs the run's {HEADER}"}).encode()
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ]
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


if __name__ == "__main__":
    print(new_token())
