"""Memory planner: per-GPU bytes of a PAPO job on megatron-core and the TP/PP/DP layouts that fit."""

from megatron_papo.planner.architectures import MODELS, QWEN2_5_VL, QWEN3_VL, ModelArch, get_model
from megatron_papo.planner.memory import Layout, MemoryEstimate, StageMemory, Workload, estimate_memory, plan

__all__ = [
    "MODELS",
    "QWEN2_5_VL",
    "QWEN3_VL",
    "Layout",
    "MemoryEstimate",
    "ModelArch",
    "StageMemory",
    "Workload",
    "estimate_memory",
    "get_model",
    "plan",
]
