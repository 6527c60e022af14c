"""Where this rank's tensors live: its GPU when CUDA is present, else the CPU (gloo)."""

from __future__ import annotations

import torch


def current_device() -> torch.device:
    """The device of this rank's model and of the tensors its collectives exchange (NCCL needs GPU ones)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
