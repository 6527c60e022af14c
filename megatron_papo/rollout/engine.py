"""The rollout interface: what every engine (embedded transformers, vLLM servers) takes and returns."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image


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
    """One sampled response: ``response_ids`` [resp_len] ends with EOS when ``finished``."""

    response_ids: torch.Tensor
    finished: bool


class RolloutEngine(Protocol):
    def generate(self, requests: list[RolloutRequest], n: int) -> list[list[Rollout]]:
        """For each request, ``n`` responses (outer list aligned with ``requests``)."""
        ...

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the policy's current weights, given as (HF parameter name, full tensor) pairs."""
        ...
