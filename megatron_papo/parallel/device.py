"""Where this rank's tensors live: its GPU when CUDA is present, else the CPU (gloo)."""

from __future__ import annotations

from typing import Any

import torch


def current_device() -> torch.device:
    """The device of this rank's model and of the tensors its collectives exchange (NCCL needs GPU ones)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with every tensor moved to ``current_device()`` (others, e.g. None, unchanged)."""
    device = current_device()
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
