"""RL objectives by name (``algorithm.objective``): the registry, and the pieces objectives combine.

``papo`` lives with PAPO (``megatron_papo/papo/loss.py``); ``vppo`` and ``papo_vppo`` here. How to add
one: ``docs/objectives.md``.
"""

from megatron_papo.objectives.registry import (
    LossContext,
    LossInputs,
    Objective,
    Prepared,
    StepTokens,
    build_objective,
    get_objective,
    objective_names,
    register_objective,
)

__all__ = [
    "LossContext",
    "LossInputs",
    "Objective",
    "Prepared",
    "StepTokens",
    "build_objective",
    "get_objective",
    "objective_names",
    "register_objective",
]
