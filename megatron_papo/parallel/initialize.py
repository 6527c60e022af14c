"""Bring up torch.distributed and megatron-core's ``parallel_state`` (TP x PP x DP)."""

from __future__ import annotations

import datetime
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_papo.parallel import cpu_bridge
from megatron_papo.parallel.config import ParallelConfig
from megatron_papo.parallel.launch_env import LaunchEnv, read_launch_env


def initialize_distributed(
    cfg: ParallelConfig, launch: LaunchEnv | None = None, seed: int = 1234
) -> LaunchEnv:
    """Initialize the process group, megatron-core's model-parallel groups and the RNG streams.

    On a CUDA machine: NCCL, one GPU per local rank. Without CUDA: gloo plus ``cpu_bridge``.
    The layout is checked against the world size before any group is made.
    """
    launch = launch or read_launch_env()
    cfg.data_parallel_size(launch.world_size)
    cuda = torch.cuda.is_available()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    else:
        cpu_bridge.install()
    if not dist.is_initialized():
        # torchrun: env:// also joins the launcher's own store (``--standalone``, ``--master_port=0``)
        tcp = f"tcp://{launch.master_addr}:{launch.master_port}"
        dist.init_process_group(
            backend=backend,
            init_method="env://" if launch.launcher == "torchrun" else tcp,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=cfg.timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        distributed_timeout_minutes=cfg.timeout_minutes,
        create_gloo_process_groups=not cuda,
    )
    set_seed(seed)
    return launch


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch; megatron-core's tracker gets the TP-rank-dependent stream.

    As in Megatron-LM, pipeline stages get different default streams (``seed + 100 * pp_rank``), so the
    layers of different stages are not initialised identically.
    """
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down megatron-core's groups and the default process group."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
