"""``\\boxed{...}`` contents, with nested braces balanced."""

from __future__ import annotations

BOXED = "\\boxed{"


def boxed_contents(text: str) -> list[str]:
    """The contents of every complete ``\\boxed{...}`` in ``text``, in order (unclosed ones are dropped)."""
    found, start = [], text.find(BOXED)
    while start != -1:
        depth, i = 1, start + len(BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append(text[start + len(BOXED) : i - 1])
        start = text.find(BOXED, start + len(BOXED))
    return found


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` (the final answer), or None."""
    found = boxed_contents(text)
    return found[-1] if found else None
