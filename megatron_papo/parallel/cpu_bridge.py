"""Run megatron-core on a machine without CUDA (gloo backend), without forking megatron-core.

megatron-core assumes CUDA in four places that matter for training with TP/PP/DP:

1. its RNG tracker (``tensor_parallel.random``) saves and restores *CUDA* generator states;
2. ``torch.cuda.current_device()`` is used as the device of buffers (p2p shapes, DDP buckets, ...);
3. the pipeline schedules (and the optimizer) create tensors with ``device="cuda"``;
4. ``torch.cuda.synchronize()`` is called after batched p2p communication;

and the optimizer asserts on type strings (``param.type() == "torch.cuda.FloatTensor"``).

``install()`` bridges each of them, and only when ``torch.cuda.is_available()`` is false:

1. a tracker with the same interface that forks the CPU generator;
2. ``torch.cuda.current_device`` returns ``torch.device("cpu")``;
3. a process-wide ``TorchFunctionMode`` maps ``device="cuda"`` and ``tensor.cuda()`` to CPU (its overhead
   was within timing noise on a 50-layer MLP forward+backward);
4. ``torch.cuda.synchronize`` becomes a no-op (CPU ops are synchronous);

and the same mode answers ``tensor.type()`` with the CUDA name
(``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``).

With CUDA present ``install()`` does nothing and megatron-core runs unchanged (NCCL).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.tensor_parallel import random as mcore_random
from torch.overrides import TorchFunctionMode

_installed = False


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron-core's RNG tracker, keeping CPU generator states instead of CUDA ones."""

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


class _CudaToCpu(TorchFunctionMode):
    """Maps ``device="cuda"`` and ``.cuda()`` to CPU; reports CPU tensors' ``type()`` by their CUDA names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def install() -> bool:
    """Bridge megatron-core's CUDA assumptions when no GPU is present. Idempotent.

    Returns True if the bridge is active (no CUDA), False if CUDA is used unchanged.
    """
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    _CudaToCpu().__enter__()  # entered for the life of the process, never exited
    _installed = True
    return True
