"""Parallel layout: the ``parallel`` section of the config tree."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """Tensor x pipeline x data parallel layout. The data-parallel size is derived from the world size."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    backend: str = "auto"  # "auto": nccl with CUDA, gloo without; or "nccl" / "gloo"
    timeout_minutes: int = 30

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for ``world_size`` ranks; raises if TP x PP does not divide it."""
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            raise ValueError(
                f"parallel sizes must be >= 1, got TP={self.tensor_model_parallel_size} "
                f"PP={self.pipeline_model_parallel_size}"
            )
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by TP x PP = {self.tensor_model_parallel_size} x "
                f"{self.pipeline_model_parallel_size} = {model_parallel}"
            )
        return world_size // model_parallel
