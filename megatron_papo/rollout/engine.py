"""The rollout interface: what every engine (embedded transformers, vLLM servers) takes and returns, and the
tokens every engine must keep out of responses (``vision_token_ids``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from megatron_papo.models.image_tokens import VISION_TOKEN_FIELDS


def vision_token_ids(hf_config) -> list[int]:
    """The token ids no engine may sample (embedded: ``suppress_tokens``; vLLM: a -100 ``logit_bias``): a
    response must not contain image placeholders, the trainer would put image features there."""
    return [int(getattr(hf_config, field)) for field in VISION_TOKEN_FIELDS]


@dataclass
class RolloutRequest:
    """One prompt to answer ``n`` times.

    input_ids: [prompt_len] with image placeholders expanded; pixel_values: [n_patches, 3*2*14*14];
    image_grid_thw: [n_images, 3]. ``seed`` makes the prompt's samples reproducible whatever the batching.
    Engines that take chat text and images (vLLM servers) use ``prompt_text`` (the chat text with one
    ``<|image_pad|>`` per image) and ``images`` (the RGB images before preprocessing) instead.
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    seed: int
    prompt_text: str | None = None
    images: list[Image.Image] | None = None


@dataclass
class Rollout:
    """One sampled response: ``response_ids`` [resp_len] ends with EOS when ``finished``.

    ``logprobs`` [resp_len] float32: the engine's log-prob of each response token under the distribution
    it sampled from (None: the engine does not report them). ``weight_version``: the policy version (the
    optimizer steps behind its weights) the engine sampled with (None: unknown).
    """

    response_ids: torch.Tensor
    finished: bool
    logprobs: torch.Tensor | None = None
    weight_version: int | None = None


class RolloutEngine(Protocol):
    last_stats: dict[str, float]
    """Figures of the latest ``generate`` / ``sync_weights`` (metric name -> value), logged each step."""

    weight_version: int
    """The policy version of the loaded weights (set by whoever syncs them), stamped on every rollout."""

    def generate(self, requests: list[RolloutRequest], n: int) -> list[list[Rollout]]:
        """For each request, ``n`` responses (outer list aligned with ``requests``)."""
        ...

    weights_to: str
    """Where the policy's weights are streamed for ``sync_weights``: ``all`` ranks (an engine on each)
    or ``rank0`` (``megatron_papo.models.weights.export_stream``)."""

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the policy's current weights, given as (HF parameter name, full tensor) pairs (a
        ``WeightStream`` from the policy, any iterable of pairs in tests)."""
        ...


def rollout_stats(rollouts: list[list[Rollout]], seconds: float) -> dict[str, float]:
    """Response tokens generated in ``seconds``, and their rate: the engines' ``rollout/*`` figures."""
    tokens = sum(len(r.response_ids) for group in rollouts for r in group)
    return {
        "rollout/tokens": float(tokens),
        "rollout/time_s": seconds,
        "rollout/tokens_per_s": tokens / max(seconds, 1e-9),
    }
