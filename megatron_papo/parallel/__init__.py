"""Distributed bring-up (torchrun / SLURM), megatron-core parallel state, and the CPU bridge."""

from megatron_papo.parallel.config import ParallelConfig
from megatron_papo.parallel.initialize import destroy_distributed, initialize_distributed, set_seed
from megatron_papo.parallel.launch_env import LaunchEnv, expand_nodelist, read_launch_env

__all__ = [
    "LaunchEnv",
    "ParallelConfig",
    "destroy_distributed",
    "expand_nodelist",
    "initialize_distributed",
    "read_launch_env",
    "set_seed",
]
