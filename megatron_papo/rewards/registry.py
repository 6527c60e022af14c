"""Reward functions by name: the registered ones, or the user's ``module:function``.

A reward function takes ``(response, answer, answer_type)`` and returns a ``RewardOutput`` (or a
mapping with ``score``, ``accuracy`` and ``format``): ``score`` is the RL reward, ``accuracy`` feeds
metrics and DAPO's dynamic sampling, ``format`` metrics.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from megatron_papo.rewards.accuracy import accuracy_reward
from megatron_papo.rewards.config import RewardConfig
from megatron_papo.rewards.format import format_reward, normalize_tags


@dataclass(frozen=True)
class RewardOutput:
    score: float
    accuracy: float
    format: float


RewardFn = Callable[[str, str, str], RewardOutput]


def papo_default(
    response: str, answer: str, answer_type: str = "math", format_weight: float = 0.1
) -> RewardOutput:
    """The reference recipe: R = (1 - w) * accuracy + w * format, w = 0.1."""
    response = normalize_tags(response)
    acc, fmt = accuracy_reward(response, answer, answer_type), format_reward(response)
    return RewardOutput((1.0 - format_weight) * acc + format_weight * fmt, acc, fmt)


def accuracy_only(response: str, answer: str, answer_type: str = "math") -> RewardOutput:
    """R = accuracy (format still reported)."""
    acc = accuracy_reward(normalize_tags(response), answer, answer_type)
    return RewardOutput(acc, acc, format_reward(response))


REWARD_FUNCTIONS = {"papo_default": papo_default, "accuracy_only": accuracy_only}


def _import_function(spec: str) -> Callable:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(
            f"reward.function {spec!r} is neither a registered reward {sorted(REWARD_FUNCTIONS)} "
            "nor of the form 'module.path:function' / 'path/to/file.py:function'"
        )
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise ImportError(f"file {module_name} does not exist")
            file_spec = importlib.util.spec_from_file_location(
                os.path.basename(module_name)[:-3], module_name
            )
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as e:  # a missing module, or any error the user's module raises while loading
        raise ValueError(
            f"reward.function {spec!r}: cannot import {module_name} ({type(e).__name__}: {e})"
        ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward.function {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def _checked(fn: Callable, name: str, response: str, answer: str, answer_type: str) -> RewardOutput:
    out = fn(response, answer, answer_type)
    if isinstance(out, Mapping) and {"score", "accuracy", "format"} <= set(out):
        out = RewardOutput(float(out["score"]), float(out["accuracy"]), float(out["format"]))
    if not isinstance(out, RewardOutput):
        raise TypeError(
            f"reward function {name} returned {out!r}; it must return a RewardOutput or a mapping with "
            "'score', 'accuracy' and 'format'"
        )
    if not all(math.isfinite(v) for v in (out.score, out.accuracy, out.format)):
        raise ValueError(f"reward function {name} returned a non-finite value {out}")
    return out


def build_reward_fn(cfg: RewardConfig) -> RewardFn:
    """The configured reward as ``fn(response, answer, answer_type) -> RewardOutput`` (outputs checked)."""
    if cfg.function == "papo_default":
        fn = functools.partial(papo_default, format_weight=cfg.format_weight)
    elif cfg.function in REWARD_FUNCTIONS:
        fn = REWARD_FUNCTIONS[cfg.function]
    else:
        fn = _import_function(cfg.function)
    return functools.partial(_checked, fn, cfg.function)
