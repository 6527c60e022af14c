"""RMSNorm for megatron-core's local layer spec that also works with sequence parallelism."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built like megatron-core's norms (``config, hidden_size, eps``). Its weight is
    marked ``sequence_parallel`` when the config is, so ``finalize_model_grads`` all-reduces the weight's
    gradient over the TP group (each rank saw only its part of the sequence): megatron-core's own torch
    norm refuses sequence parallelism without transformer-engine or Apex."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)  # as the layers' weights
        self.weight.sequence_parallel = config.sequence_parallel
