"""Rollouts from OpenAI-compatible vLLM servers, and weight sync into them: the ``VllmEngine``.

The engine puts together the modules of one concern each:

- ``vllm_requests``: a ``RolloutRequest`` as a ``/v1/chat/completions`` request (chat messages, images as
  data URLs, sampling parameters, the vision tokens suppressed) and the answer as rollouts;
- ``vllm_servers``: the server pool: least-loaded choice, failover, down servers probed and revived;
- ``vllm_http``: one server: JSON over HTTP with timeouts, health, the cache resets of a new version;
- ``vllm_weights``: weight versions and the sync (``directory`` or ``broadcast``) that brings servers to
  them, over ``vllm_sync`` (checkpoint names, the safetensors directory) and ``vllm_broadcast`` (process
  groups into the servers' workers, ``weight_group``; the server side is ``vllm_plugin``).

A request goes to a server of the pool; a failed, timed-out or malformed answer marks that server down and
the request moves to another one (up to ``max_attempts`` servers); a 4xx answer (the request itself is
wrong) is raised at once.

**Log-probs.** ``Rollout.logprobs`` are the server's log-probs of the sampled tokens. tools/launch_vllm.sh
starts servers with ``--logprobs-mode processed_logprobs``: the distribution actually sampled from (after
temperature, top-k and top-p), which with ``top_p`` = 1 is the trainer's ``log_softmax(logits / T)``
(vLLM's default, raw log-probs, ignores the temperature). ``megatron_papo.rollout.correction`` measures
them against the trainer's and offers the truncated importance-sampling correction.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import AutoConfig

from megatron_papo.config_io import check_choices
from megatron_papo.rollout.config import RolloutConfig
from megatron_papo.rollout.engine import Rollout, RolloutRequest, rollout_stats, vision_token_ids
from megatron_papo.rollout.sync_auth import ENV, environment_token
from megatron_papo.rollout.vllm_http import ServerError
from megatron_papo.rollout.vllm_requests import completion_body, parse_completion
from megatron_papo.rollout.vllm_servers import ServerPool
from megatron_papo.rollout.vllm_weights import ServerWeights
from megatron_papo.training.run_dir import weight_sync_dir


@dataclass
class VllmConfig:
    """How the engine talks to its servers (``urls``) and where weight syncs are written (``sync_dir``).

    ``model``: the served model name (None: the first one the server lists). ``min_pixels`` /
    ``max_pixels``: the image resolution range of the trainer's processor, passed to the server's.
    ``max_attempts``: servers tried per request. ``bucket_bytes``: the most bytes per safetensors shard or
    broadcast. ``weight_sync``: directory or broadcast (``vllm_weights``); for broadcast, ``sync_backend``
    (gloo or nccl; None: nccl when CUDA is available), ``sync_host`` (the address servers reach the trainer
    at; None: this machine's address on the route to each server) and ``sync_timeout_s`` (joining a group,
    one broadcast). ``sync_token``: the run's weight-sync secret (``sync_auth``; None: none is sent, and
    servers refuse every sync).
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
    sync_token: str | None = field(default=None, repr=False)

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


class VllmEngine:
    """The ``RolloutEngine`` over vLLM servers; ``last_stats`` holds the latest rollout and sync figures.

    ``pool``: the servers (``servers``: the same list); ``weights``: the synced weights and their version.
    """

    weights_to = "rank0"  # global rank 0 writes or broadcasts them

    def __init__(self, cfg: VllmConfig, rollout: RolloutConfig, hf_path: str) -> None:
        self.cfg = cfg
        self.rollout = rollout
        self.hf_path = hf_path
        hf = AutoConfig.from_pretrained(hf_path)
        text = hf.get_text_config()
        self.vocab_size = int(text.vocab_size)
        self.tied = bool(hf.tie_word_embeddings)
        self.logit_bias = {str(t): -100.0 for t in vision_token_ids(hf)}
        self.weights = ServerWeights(cfg, hf_path, self.tied)
        self.pool = ServerPool(
            cfg.urls, cfg.health_timeout_s, cfg.retry_down_after_s, self.weights.refresh, cfg.sync_token
        )
        self.servers = self.pool.servers
        self.model = cfg.model
        self.last_stats: dict[str, float] = {}
        self.weight_version = 0

    @classmethod
    def from_config(cls, cfg) -> VllmEngine:
        """The engine of a ``TrainConfig``: servers ``rollout.vllm_urls``, syncs under the run directory, the
        run's token from ``$MEGATRON_PAPO_SYNC_TOKEN`` (required)."""
        token = environment_token()
        if token is None:
            raise ValueError(
                f"rollout.backend is 'vllm' but ${ENV} is not set: export the token the servers were "
                "started with (tools/launch_vllm.sh needs it too; "
                "`python -m megatron_papo.rollout.sync_auth` makes a fresh one per run)"
            )
        vllm = VllmConfig(
            urls=list(cfg.rollout.vllm_urls),
            sync_dir=weight_sync_dir(cfg.trainer.output_dir),
            min_pixels=cfg.data.min_pixels,
            max_pixels=cfg.data.max_pixels,
            weight_sync=cfg.rollout.vllm_weight_sync,
            sync_host=cfg.rollout.vllm_sync_host,
            sync_token=token,
        )
        return cls(vllm, cfg.rollout, cfg.model.hf_path)

    def _start(self) -> None:
        """Wait (bounded) for every server, then learn the served model name."""
        if self.model is None:
            self.model = self.pool.start(self.cfg.startup_timeout_s)

    def generate(self, requests: list[RolloutRequest], n: int) -> list[list[Rollout]]:
        """``n`` samples per request, requests spread over the servers; stats in ``last_stats``."""
        if not requests:
            return []
        self._start()
        start, self.pool.retries = time.monotonic(), 0
        workers = min(len(requests), self.cfg.max_in_flight_per_server * len(self.servers))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            out = list(pool.map(lambda r: self._complete(r, n), requests))
        for rollout in (r for rollouts in out for r in rollouts):
            rollout.weight_version = self.weight_version
        self.last_stats |= rollout_stats(out, time.monotonic() - start) | {
            "rollout/retries": float(self.pool.retries),
            "rollout/servers_up": float(self.pool.up_count()),
        }
        return out

    def _complete(self, req: RolloutRequest, n: int) -> list[Rollout]:
        body = completion_body(
            req, n, self.model, self.rollout, self.logit_bias, self.cfg.min_pixels, self.cfg.max_pixels
        )
        tried: set[str] = set()
        errors = []
        for _ in range(self.cfg.max_attempts):
            server = self.pool.acquire(tried)
            if server is None:
                break
            tried.add(server.url)
            try:
                answer = server.post_json("/v1/chat/completions", body, self.cfg.request_timeout_s)
                return parse_completion(answer, req, n, server.url, self.vocab_size)
            except ServerError as e:
                if not e.retryable:
                    raise
                errors.append(str(e))
                self.pool.failed(server, str(e))
            finally:
                self.pool.release(server)
        down = self.pool.down_report()
        raise RolloutError(
            f"rollout request (seed {req.seed}) failed: {' | '.join(errors) or 'no server is up'}"
            + (f" (down: {down})" if down else "")
        )

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send the weights (global rank 0) to every up server, by directory or broadcast; a collective
        when ``torch.distributed`` is initialised (every rank iterates ``named_tensors``, then a barrier)."""
        start = time.monotonic()
        self.last_stats |= self.weights.sync(named_tensors, self.servers, self._start)
        self.last_stats["sync/time_s"] = time.monotonic() - start
