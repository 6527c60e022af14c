"""The format reward of the reference recipe: reasoning in ``<think>...</think>`` then a boxed answer.

Checked by plain searches, in linear time: the reference's regex ``<think>.*</think>.*\\boxed\\{.*\\}.*``
backtracks for seconds on a long response with many ``</think>`` and ``\\boxed{`` and no ``}``.
"""

from __future__ import annotations

import re

_TAG_CHARS = re.compile(r"([<>/])")


def normalize_tags(response: str) -> str:
    """Drop whitespace around ``<``, ``>`` and ``/`` (the reference does this so ``< think >`` counts)."""
    pieces = _TAG_CHARS.split(response)  # text, tag char, text, ..., text
    last = len(pieces) - 1
    for i in range(0, len(pieces), 2):
        piece = pieces[i].lstrip() if i else pieces[i]
        pieces[i] = piece.rstrip() if i < last else piece
    return "".join(pieces)


def format_reward(response: str) -> float:
    """1.0 if the response is ``<think>...</think>`` followed by a ``\\boxed{...}`` somewhere, else 0.0."""
    text = normalize_tags(response)
    if not text.startswith("<think>"):
        return 0.0
    end_think = text.find("</think>", len("<think>"))
    box = -1 if end_think < 0 else text.find("\\boxed{", end_think + len("</think>"))
    return 1.0 if box >= 0 and text.find("}", box + len("\\boxed{")) >= 0 else 0.0
