"""``\\boxed{...}`` contents, with nested braces balanced, in one pass over the text (linear time: an
answer of thousands of nested or unclosed boxes costs no more than reading it)."""

from __future__ import annotations

import re

BOXED = "\\boxed{"
_TOKENS = re.compile(r"\\boxed\{|[{}]")


def _box_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of the content of every complete ``\\boxed{...}``, in the order they close."""
    spans, opened = [], []  # opened: (content start, whether the brace opened a box) per open brace
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token != "}":
            opened.append((match.end(), token == BOXED))
        elif opened:
            start, is_box = opened.pop()
            if is_box:
                spans.append((start, match.start()))
    return spans


def boxed_contents(text: str) -> list[str]:
    """The contents of every complete ``\\boxed{...}`` in ``text``, in order (unclosed ones are dropped)."""
    return [text[start:end] for start, end in sorted(_box_spans(text))]


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` (the final answer), or None."""
    spans = _box_spans(text)
    if not spans:
        return None
    start, end = max(spans)
    return text[start:end]
