"""Memory planner: per-GPU bytes of a PAPO job on megatron-core and the TP/PP/DP layouts that fit."""

from megatron_papo.planner.architectures import QWEN2_5_VL, ModelArch, get_model
from megatron_papo.planner.memory import Layout, MemoryEstimate, StageMemory, Workload, estimate_memory, plan

__all__ = [
    "QWEN2_5_VL",
    "Layout",
    "MemoryEstimate",
    "ModelArch",
    "StageMemory",
    "Workload",
    "estimate_memory",
    "get_model",
    "plan",
]
