"""megatron-papo: Perception-Aware Policy Optimization for VLMs on megatron-core."""

__version__ = "0.1.0"
