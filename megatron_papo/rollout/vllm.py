"""Rollouts from OpenAI-compatible vLLM servers, and weight sync into them.

**Requests.** Each ``RolloutRequest`` becomes one ``/v1/chat/completions`` request for ``n`` samples: the
chat text is split back into its messages, images travel as base64 PNG data URLs, and the server returns
the token ids (``return_token_ids``) and per-token log-probs of every sample, so nothing is re-tokenised.
The server's prompt token ids (image pads expanded by its own processor) must equal the trainer's
``input_ids``: a different tokenizer, chat template or image resolution is an error, not a silent drift.

**Servers.** Requests go to the up server with the fewest requests in flight. A failed, timed-out or
malformed answer marks that server down and the request moves to another one; a down server is probed
(``/health``) again after ``retry_down_after_s`` and, if its weights are stale, reloaded before use. A
4xx answer (the request itself is wrong) is raised at once.

**Weight sync.** ``weight_sync: directory`` (portable): global rank 0 writes the exported HF tensors bucket
by bucket as a safetensors directory under ``sync_dir`` (which the servers must see: shared storage),
renamed into place once complete, then asks each server to reload from it through vLLM's dev-mode
endpoints (``VLLM_SERVER_DEV_MODE=1``): ``POST /collective_rpc`` with ``reload_weights(weights_path=...)``.
``weight_sync: broadcast`` (fast path, no file): the buckets go straight from rank 0 into the servers'
workers over a process group per server (NCCL on GPUs, gloo on CPUs) through vLLM's weight-transfer
endpoints and the ``megatron_papo`` engine of ``vllm_plugin``; see ``vllm_broadcast``. Either way the
server then drops the caches of the old weights and reports the new version (``VllmServer.commit``).
A server that is down during a sync gets the weights before it is used again: from the directory, or
(broadcast) at the next sync, staying out of use until then.

**Log-probs.** ``Rollout.logprobs`` are the server's log-probs of the sampled tokens. tools/launch_vllm.sh
starts servers with ``--logprobs-mode processed_logprobs``: the distribution actually sampled from (after
temperature, top-k and top-p), which with ``top_p`` = 1 is the trainer's ``log_softmax(logits / T)``
(vLLM's default, raw log-probs, ignores the temperature). ``megatron_papo.rollout.correction`` measures
them against the trainer's and offers the truncated importance-sampling correction.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from PIL import Image
from transformers import AutoConfig

from megatron_papo.config_io import check_choices
from megatron_papo.rollout.config import RolloutConfig
from megatron_papo.rollout.engine import Rollout, RolloutRequest, rollout_stats, vision_token_ids
from megatron_papo.rollout.vllm_broadcast import BroadcastSync
from megatron_papo.rollout.vllm_http import ServerError, VllmServer, wait_until_healthy
from megatron_papo.rollout.vllm_sync import checkpoint_tensors, write_weight_directory

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
GENERATION_PROMPT = "<|im_start|>assistant\n"
_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n", re.DOTALL)


@dataclass
class VllmConfig:
    """How the engine talks to its servers (``urls``) and where weight syncs are written (``sync_dir``).

    ``model``: the served model name (None: the first one the server lists). ``min_pixels`` /
    ``max_pixels``: the image resolution range of the trainer's processor, passed to the server's.
    ``max_attempts``: servers tried per request. ``bucket_bytes``: tensors per safetensors shard or
    broadcast. ``weight_sync``: directory or broadcast (module docstring); for broadcast, ``sync_backend``
    (gloo or nccl; None: nccl when CUDA is available), ``sync_host`` (the address servers reach the trainer
    at; None: this machine's address on the route to each server) and ``sync_timeout_s`` (joining a group,
    one broadcast).
    """

    urls: list[str]
    sync_dir: str
    model: str | None = None
    request_timeout_s: float = 900.0
    startup_timeout_s: float = 900.0
    health_timeout_s: float = 5.0
    retry_down_after_s: float = 30.0
    max_attempts: int = 3
    max_in_flight_per_server: int = 8
    bucket_bytes: int = 1 << 30
    min_pixels: int | None = None
    max_pixels: int | None = None
    weight_sync: Literal["directory", "broadcast"] = "directory"
    sync_backend: Literal["gloo", "nccl"] | None = None
    sync_host: str | None = None
    sync_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("vllm.urls is empty: give at least one server URL")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"vllm.urls: {url!r} is not an http(s) URL")
        check_choices(self, "vllm")
        for name in ("request_timeout_s", "startup_timeout_s", "health_timeout_s", "sync_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"vllm.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_attempts", "max_in_flight_per_server", "bucket_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"vllm.{name} must be >= 1, got {getattr(self, name)}")


class RolloutError(RuntimeError):
    """A request that failed on every server it was tried on."""


def image_data_url(image: Image.Image) -> str:
    """``image`` as a base64 PNG data URL (lossless: the server sees the trainer's pixels)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_messages(prompt_text: str, images: list[Image.Image]) -> list[dict]:
    """The OpenAI chat messages of a Qwen chat text (``<|im_start|>role\\n...<|im_end|>\\n`` turns ending
    with the generation prompt); each ``<|vision_start|><|image_pad|><|vision_end|>`` takes the next image."""
    if not prompt_text.endswith(GENERATION_PROMPT):
        raise ValueError(f"prompt text does not end with the generation prompt {GENERATION_PROMPT!r}")
    body = prompt_text[: -len(GENERATION_PROMPT)]
    if body.count(IMAGE) != len(images):
        raise ValueError(f"prompt text has {body.count(IMAGE)} image placeholders for {len(images)} images")
    pending = iter(images)
    messages, pos = [], 0
    for turn in _TURN.finditer(body):
        if turn.start() != pos:
            raise ValueError(f"prompt text has {body[pos : turn.start()]!r} outside chat turns")
        pos = turn.end()
        role, pieces = turn.group(1), turn.group(2).split(IMAGE)
        if len(pieces) == 1:
            messages.append({"role": role, "content": pieces[0]})
            continue
        content: list[dict] = []
        for i, piece in enumerate(pieces):
            if i:
                content.append({"type": "image_url", "image_url": {"url": image_data_url(next(pending))}})
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    if pos != len(body):
        raise ValueError(f"prompt text has {body[pos:]!r} outside chat turns")
    return messages


class VllmEngine:
    """The ``RolloutEngine`` over vLLM servers; ``last_stats`` holds the latest rollout and sync figures."""

    def __init__(self, cfg: VllmConfig, rollout: RolloutConfig, hf_path: str) -> None:
        self.cfg = cfg
        self.rollout = rollout
        self.hf_path = hf_path
        hf = AutoConfig.from_pretrained(hf_path)
        text = hf.get_text_config()
        self.vocab_size = int(text.vocab_size)
        self.tied = bool(text.tie_word_embeddings)
        self.logit_bias = {str(t): -100.0 for t in vision_token_ids(hf)}
        self.servers = [VllmServer(url) for url in cfg.urls]
        self.model = cfg.model
        self.weights_version = 0
        self.weights_path: str | None = None
        # the version a server reports names this run too (every rank's engine takes rank 0's tag at the
        # first sync): a server that outlived an earlier run, or serves another trainer, never passes for
        # holding this run's weights
        self._run_tag = uuid.uuid4().hex[:12]
        self.broadcast = (
            BroadcastSync(cfg.sync_backend, cfg.sync_host, cfg.sync_timeout_s, cfg.request_timeout_s)
            if cfg.weight_sync == "broadcast"
            else None
        )
        self.last_stats: dict[str, float] = {}
        self._lock = threading.Lock()
        self._retries = 0

    @classmethod
    def from_config(cls, cfg) -> VllmEngine:
        """The engine of a ``TrainConfig``: servers ``rollout.vllm_urls``, syncs under the run directory."""
        vllm = VllmConfig(
            urls=list(cfg.rollout.vllm_urls),
            sync_dir=os.path.join(cfg.trainer.output_dir, "vllm_weights"),
            min_pixels=cfg.data.min_pixels,
            max_pixels=cfg.data.max_pixels,
            weight_sync=cfg.rollout.vllm_weight_sync,
            sync_host=cfg.rollout.vllm_sync_host,
        )
        return cls(vllm, cfg.rollout, cfg.model.hf_path)

    # ---------------------------------------------------------------- servers

    def _start(self) -> None:
        """Wait (bounded) for every server, then learn the served model name."""
        if self.model is not None:
            return
        wait_until_healthy(self.servers, self.cfg.startup_timeout_s)
        server = self.servers[0]
        raw = server.request("GET", "/v1/models", None, self.cfg.health_timeout_s)
        try:
            self.model = json.loads(raw)["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ServerError(server.url, f"malformed /v1/models answer: {raw[:200]!r}") from e

    @property
    def version(self) -> str:
        """The version string of the latest synced weights, as servers report it."""
        return f"{self._run_tag}-{self.weights_version}"

    def _reload(self, server: VllmServer) -> None:
        """Give ``server`` the latest synced weights (nothing when it already holds them). After a
        broadcast sync it missed, a server stays out of use (``ServerError``) until the next sync."""
        if self.weights_version == 0:
            return
        info = server.request("GET", "/weight_info", None, self.cfg.health_timeout_s)
        try:
            if json.loads(info)["weight_version"] == self.version:
                return
        except (ValueError, KeyError, TypeError) as e:
            raise ServerError(server.url, f"malformed /weight_info answer: {info[:200]!r}") from e
        if self.broadcast is not None:
            raise ServerError(server.url, f"missed the broadcast of {self.version}; rejoins at the next sync")
        timeout = self.cfg.request_timeout_s
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": self.weights_path}, "timeout": timeout}
        server.post_json("/collective_rpc", rpc, timeout)
        server.commit(self.version, timeout)

    def _revive(self, server: VllmServer) -> bool:
        """A down server whose wait is over: back in use if healthy and (re)loaded with current weights."""
        if time.monotonic() - server.down_since < self.cfg.retry_down_after_s:
            return False
        if not server.healthy(self.cfg.health_timeout_s):
            server.mark_down(server.last_error)
            return False
        try:
            self._reload(server)
        except ServerError as e:
            server.mark_down(str(e))
            return False
        server.mark_up()
        return True

    def _acquire(self, tried: set[str]) -> VllmServer | None:
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

    def _release(self, server: VllmServer) -> None:
        with self._lock:
            server.in_flight -= 1

    # ---------------------------------------------------------------- rollouts

    def generate(self, requests: list[RolloutRequest], n: int) -> list[list[Rollout]]:
        """``n`` samples per request, requests spread over the servers; stats in ``last_stats``."""
        if not requests:
            return []
        self._start()
        start, self._retries = time.monotonic(), 0
        workers = min(len(requests), self.cfg.max_in_flight_per_server * len(self.servers))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            out = list(pool.map(lambda r: self._complete(r, n), requests))
        self.last_stats |= rollout_stats(out, time.monotonic() - start) | {
            "rollout/retries": float(self._retries),
            "rollout/servers_up": float(sum(not s.down for s in self.servers)),
        }
        return out

    def _body(self, req: RolloutRequest, n: int) -> dict:
        if req.prompt_text is None or req.images is None:
            raise ValueError("the vLLM rollout engine needs prompt_text and images on every RolloutRequest")
        body = {
            "model": self.model,
            "messages": chat_messages(req.prompt_text, req.images),
            "n": n,
            "temperature": self.rollout.temperature,
            "top_p": self.rollout.top_p,
            "max_tokens": self.rollout.max_new_tokens,
            "seed": req.seed,
            "logprobs": True,
            "top_logprobs": 0,
            "return_token_ids": True,
            "logit_bias": self.logit_bias,
        }
        pixels = {"min_pixels": self.cfg.min_pixels, "max_pixels": self.cfg.max_pixels}
        if any(v is not None for v in pixels.values()):
            body["mm_processor_kwargs"] = {k: v for k, v in pixels.items() if v is not None}
        return body

    def _complete(self, req: RolloutRequest, n: int) -> list[Rollout]:
        body = self._body(req, n)
        tried: set[str] = set()
        errors = []
        for _ in range(self.cfg.max_attempts):
            server = self._acquire(tried)
            if server is None:
                break
            tried.add(server.url)
            try:
                answer = server.post_json("/v1/chat/completions", body, self.cfg.request_timeout_s)
                return self._parse(answer, req, n, server)
            except ServerError as e:
                if not e.retryable:
                    raise
                errors.append(str(e))
                server.mark_down(str(e))
                with self._lock:
                    self._retries += 1
            finally:
                self._release(server)
        down = "; ".join(f"{s.url}: {s.last_error}" for s in self.servers if s.down)
        raise RolloutError(
            f"rollout request (seed {req.seed}) failed: {' | '.join(errors) or 'no server is up'}"
            + (f" (down: {down})" if down else "")
        )

    def _parse(self, answer: dict, req: RolloutRequest, n: int, server: VllmServer) -> list[Rollout]:
        """The ``n`` rollouts of a chat completion answer; anything unexpected is a malformed answer."""

        def malformed(what: str) -> ServerError:
            return ServerError(server.url, f"malformed chat completion answer: {what}")

        prompt_ids = answer.get("prompt_token_ids")
        if not isinstance(prompt_ids, list):
            raise malformed("no prompt_token_ids list (the server must support return_token_ids)")
        expected = req.input_ids.tolist()
        if prompt_ids != expected:
            at = next((i for i, (a, b) in enumerate(zip(prompt_ids, expected, strict=False)) if a != b), None)
            at = min(len(prompt_ids), len(expected)) if at is None else at
            raise ValueError(
                f"vLLM server {server.url} tokenised the prompt (seed {req.seed}) differently from the "
                f"trainer: "
                f"{len(prompt_ids)} vs {len(expected)} tokens, first difference at position {at} "
                f"(server {prompt_ids[at : at + 5]}, trainer {expected[at : at + 5]}); do the server's "
                "tokenizer, chat template and image pixel range match the trainer's?"
            )
        choices = answer.get("choices")
        if not isinstance(choices, list) or len(choices) != n:
            raise malformed(f"expected {n} choices, got {type(choices).__name__} {str(choices)[:100]}")
        rollouts = []
        try:
            for choice in sorted(choices, key=lambda c: c["index"]):
                ids = choice["token_ids"]
                lps = [float(t["logprob"]) for t in choice["logprobs"]["content"]]
                finish = choice["finish_reason"]
                if not ids or len(ids) != len(lps):
                    raise malformed(f"{len(ids)} token ids with {len(lps)} log-probs")
                if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
                    raise malformed(f"token ids outside [0, {self.vocab_size}): {ids[:10]}")
                if finish not in ("stop", "length"):
                    raise malformed(f"finish_reason {finish!r}")
                rollouts.append(
                    Rollout(
                        response_ids=torch.tensor(ids, dtype=torch.int64),
                        finished=finish == "stop",
                        logprobs=torch.tensor(lps, dtype=torch.float32),
                    )
                )
        except (KeyError, TypeError, ValueError) as e:
            raise malformed(f"{type(e).__name__}: {e}") from e
        return rollouts

    # ---------------------------------------------------------------- weight sync

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send the weights (global rank 0) to every up server, by directory or broadcast; a collective
        when ``torch.distributed`` is initialised (every rank iterates ``named_tensors``, then a barrier)."""
        start = time.monotonic()
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if dist.is_initialized() and self.weights_version == 0:
            tag = [self._run_tag]
            dist.broadcast_object_list(tag, src=0)
            self._run_tag = tag[0]
        self.weights_version += 1
        if not rank0:
            for _ in named_tensors:  # take part in the export's gathers
                pass
        elif self.broadcast is not None:
            self._broadcast_sync(named_tensors)
        else:
            self._directory_sync(named_tensors)
        if dist.is_initialized():
            dist.barrier()
        self.last_stats["sync/time_s"] = time.monotonic() - start

    def _directory_sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        previous = self.weights_path
        self.weights_path = os.path.join(os.path.abspath(self.cfg.sync_dir), f"v{self.weights_version}")
        nbytes = write_weight_directory(
            named_tensors, self.weights_path, self.hf_path, self.tied, self.cfg.bucket_bytes
        )
        self._start()
        synced = 0
        for server in self.servers:
            if server.down:
                continue  # reloaded when it is revived
            try:
                self._reload(server)
                synced += 1
            except ServerError as e:
                server.mark_down(str(e))
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        # only the syncing rank reports these: metrics are averaged over the ranks reporting them
        self.last_stats |= {"sync/bytes": float(nbytes), "sync/servers": float(synced)}

    def _broadcast_sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        assert self.broadcast is not None
        self._start()
        # a down server that answers again rejoins now: it gets these weights with the others
        targets = [s for s in self.servers if not s.down or s.healthy(self.cfg.health_timeout_s)]
        pairs = checkpoint_tensors(named_tensors, self.hf_path, self.tied)
        live, nbytes = self.broadcast.sync(targets, pairs, self.cfg.bucket_bytes)
        for server in live:
            try:
                server.commit(self.version, self.cfg.request_timeout_s)
                server.mark_up()
            except ServerError as e:
                self.broadcast.drop(server, e)
        synced = sum(not s.down for s in live)
        self.last_stats |= {"sync/bytes": float(nbytes), "sync/servers": float(synced)}
