"""Objectives by name: ``algorithm.objective`` picks one, ``register_objective`` adds one.

An objective is a subclass of ``Objective`` in one module: what it needs from the RL step (typed
properties the trainer reads), an optional ``prepare`` run once per optimizer step without gradient, and
``loss`` for one micro-batch. ``docs/objectives.md`` walks through adding one (VPPO as the example).

The trainer's side, per optimizer step (mini-batch) on the last pipeline stage:

    objective = build_objective(cfg.algorithm)
    prepared = objective.prepare(StepTokens(...rows of this rank's mini-batch...), micro_batch_size, dp_group)
    for j, rows in enumerate(micro-batches):                     # consecutive rows, micro_batch_size each
        loss, metrics = objective.loss(LossInputs(...), LossContext(...), prepared.select(rows) or None)
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from megatron_papo.objectives.pieces import TokenCounts
    from megatron_papo.papo.config import AlgorithmConfig
    from megatron_papo.training.packing import Packing

# modules whose import registers the built-in objectives (imported on the first lookup)
_BUILTIN = (
    "megatron_papo.papo.loss",
    "megatron_papo.objectives.vppo",
    "megatron_papo.objectives.papo_vppo",
)
_OBJECTIVES: dict[str, type[Objective]] = {}
P = TypeVar("P", bound="Prepared")


@dataclass(frozen=True)
class StepTokens:
    """What ``prepare`` sees: one optimizer step's sequences on this DP rank, rows in micro-batch order.

    loss_mask, old_log_probs: [N, L]; advantages: [N]; masked_log_probs: [N, L] (the step's no-grad pass
    with the masked images; present when ``masked_log_probs_needed``). old_log_probs is None on-policy
    (no old log-prob pass) unless ``old_log_probs_in_prepare``.
    """

    loss_mask: torch.Tensor
    advantages: torch.Tensor
    old_log_probs: torch.Tensor | None
    masked_log_probs: torch.Tensor | None = None


@dataclass(frozen=True)
class Prepared:
    """Base of what ``prepare`` returns: every field a tensor [N, ...] indexed by the rows of
    ``StepTokens``, so a micro-batch takes its share with ``select``."""

    def select(self: P, rows: torch.Tensor) -> P:
        """The rows ``rows`` ([b] int64) of every field."""
        fields = dataclasses.fields(self)
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[rows] for f in fields})


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch on the last pipeline stage.

    logits: [b, s, vocab/tp] (with gradient), or [t, vocab/tp] with ``packing`` (packed sequences: the
    micro-batch's real tokens, ``training.packing``); labels, loss_mask, old_log_probs: [b, s] (old None:
    on-policy, the update's own log-probs stand in); advantages: [b]; masked_logits: logits' shape when
    ``masked_logits_in_update``; masked_log_probs, ref_log_probs, rollout_is_weights: [b, s] when the step
    computed them; sft_weights: [b] with ``use_sft_loss``.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    old_log_probs: torch.Tensor | None
    masked_logits: torch.Tensor | None = None
    masked_log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    sft_weights: torch.Tensor | None = None
    rollout_is_weights: torch.Tensor | None = None
    packing: Packing | None = None


@dataclass(frozen=True)
class LossContext:
    """The optimizer step's constants: sampling ``temperature``, training ``progress`` in [0, 1]
    (annealing) and the mini-batch's ``counts`` (``TokenCounts``, with ``global_token_mean``)."""

    temperature: float = 1.0
    progress: float = 0.0
    counts: TokenCounts | None = None


class Objective:
    """An RL objective, built from (and validating) the ``algorithm`` config.

    Needs (properties the trainer reads): ``masked_log_probs_needed`` (a per-step no-grad pass with the
    masked images fills ``masked_log_probs``), ``masked_logits_in_update`` (the update's micro-batches are
    doubled: original then masked images, masked logits with gradient), ``ref_log_probs_needed``,
    ``old_log_probs_in_prepare``. The defaults are those of the config's PAPO terms (gamma, eta2,
    masked_grad, ref_kl_coef), which are 0 / off unless an objective uses them.
    """

    def __init__(self, cfg: AlgorithmConfig) -> None:
        self.cfg = cfg

    @property
    def masked_log_probs_needed(self) -> bool:
        return self.cfg.uses_masked_images and not self.cfg.masked_grad

    @property
    def masked_logits_in_update(self) -> bool:
        return self.cfg.masked_in_update

    @property
    def ref_log_probs_needed(self) -> bool:
        return self.cfg.uses_ref_kl

    @property
    def old_log_probs_in_prepare(self) -> bool:
        """``prepare`` reads the old log-probs: an on-policy step still computes them before the update."""
        return False

    @property
    def masked_images_needed(self) -> bool:
        """The step builds masked images (for a no-grad pass, the update, or both)."""
        return self.masked_log_probs_needed or self.masked_logits_in_update

    def prepare(
        self, tokens: StepTokens, micro_batch_size: int, group: dist.ProcessGroup | None
    ) -> Prepared | None:
        """Per optimizer step, no gradient: objective-specific tensors from this rank's ``tokens`` (rows of
        ``micro_batch_size`` consecutive micro-batches); ``group``: the DP group (a collective when the
        objective reduces over the whole mini-batch: every DP rank of the last stage calls it)."""
        return None

    def loss(
        self, inputs: LossInputs, ctx: LossContext, prepared: Prepared | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch's loss and metrics; ``prepared``: this micro-batch's rows of ``prepare``."""
        raise NotImplementedError


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: make ``algorithm.objective=name`` build this ``Objective``."""

    def register(cls: type[Objective]) -> type[Objective]:
        if name in _OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered ({_OBJECTIVES[name].__module__})")
        _OBJECTIVES[name] = cls
        return cls

    return register


def objective_names() -> list[str]:
    for module in _BUILTIN:
        importlib.import_module(module)
    return sorted(_OBJECTIVES)


def get_objective(name: str) -> type[Objective]:
    names = objective_names()
    if name not in _OBJECTIVES:
        raise ValueError(f"algorithm.objective must be one of {names}, got {name!r}")
    return _OBJECTIVES[name]


def build_objective(cfg: AlgorithmConfig) -> Objective:
    """The objective ``cfg.objective`` names, built from ``cfg`` (which it validates)."""
    return get_objective(cfg.objective)(cfg)
