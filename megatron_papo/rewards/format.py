"""The format reward of the reference recipe: reasoning in ``<think>...</think>`` then a boxed answer."""

from __future__ import annotations

import re

_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
_TAG_SPACES = re.compile(r"\s*(<|>|/)\s*")


def normalize_tags(response: str) -> str:
    """Drop whitespace around ``<``, ``>`` and ``/`` (the reference does this so ``< think >`` counts)."""
    return _TAG_SPACES.sub(r"\1", response)


def format_reward(response: str) -> float:
    """1.0 if the response is ``<think>...</think>`` followed by a ``\\boxed{...}`` somewhere, else 0.0."""
    return 1.0 if _FORMAT.fullmatch(normalize_tags(response)) else 0.0
