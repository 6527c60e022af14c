"""The accuracy reward: the response's final ``\\boxed{}`` answer against the reference answer.

``answer_type`` picks the comparison: ``math`` (normalised text match, else math-verify's symbolic
equivalence: 1/2 = 0.5 = \\frac{1}{2}, 50\\% = 0.5, x=2 vs 2), ``choice`` (option letters: "B", "(B)",
"B. blue" all read as B) and ``exact`` (normalised text: case, spaces, \\text{}, a final period).
"""

from __future__ import annotations

import re
import threading

from math_verify import parse, verify

from megatron_papo.data.shard_format import ANSWER_TYPES
from megatron_papo.rewards.boxed import last_boxed

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")
_CHOICE = re.compile(r"\(([a-z])\)(?:\s.*)?|([a-z])(?:[.:)](?:\s.*)?)?", re.DOTALL)
_WORDS = re.compile(r"[a-z][a-z\s\-']*")
MATH_TIMEOUT_S = 5


def normalize_text(answer: str) -> str:
    """Lower case, ``\\text{x}`` -> x, no ``$``, single spaces, no final period."""
    text = _TEXT_WRAPPER.sub(r"\1", answer).replace("$", "")
    return " ".join(text.lower().split()).rstrip(".").strip()


def choice_letter(answer: str) -> str | None:
    """The option letter of "B", "(B)", "B.", "B) blue", "(b) blue"; None for anything else ("Blue")."""
    match = _CHOICE.fullmatch(normalize_text(answer))
    return None if match is None else (match.group(1) or match.group(2))


def math_equal(prediction: str, reference: str) -> bool:
    """Symbolic equivalence by math-verify (with its signal timeout only where signals work)."""
    timeout = MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)
    pred = parse(f"\\boxed{{{prediction}}}", parsing_timeout=timeout)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))


def grade_answer(prediction: str, reference: str, answer_type: str) -> bool:
    """Whether ``prediction`` (a boxed content) answers ``reference`` (itself maybe ``\\boxed{}``)."""
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {answer_type!r}; use one of {ANSWER_TYPES}")
    reference = last_boxed(reference) or reference
    pred, gold = normalize_text(prediction), normalize_text(reference)
    if not pred:
        return False
    if answer_type == "choice":
        letters = choice_letter(prediction), choice_letter(reference)
        return letters[0] == letters[1] if None not in letters else pred == gold
    if answer_type == "exact" or pred == gold:
        return pred == gold
    if _WORDS.fullmatch(gold) and len(gold) > 1:
        return False  # plain words: math-verify would read "red" as r*e*d and accept "der"
    return math_equal(prediction, reference)


def accuracy_reward(response: str, answer: str, answer_type: str = "math") -> float:
    """1.0 if the response's last ``\\boxed{}`` holds the right answer, else 0.0 (no box: 0.0)."""
    prediction = last_boxed(response)
    return 1.0 if prediction is not None and grade_answer(prediction, answer, answer_type) else 0.0
