"""The server side of broadcast weight sync: a vLLM weight-transfer engine, loaded as a vLLM plugin.

vLLM (>= 0.32) receives trainer weights through a pluggable *weight-transfer engine* driven over HTTP
(``/init_weight_transfer_engine``, ``/start_weight_update``, ``/update_weights``,
``/finish_weight_update``; dev mode). Its built-in ``nccl`` engine needs vLLM's own communicator on the
trainer side; this engine, registered as backend ``megatron_papo``, instead joins the group of
``megatron_papo.rollout.weight_group`` (gloo on CPU, NCCL on GPU) that the trainer opens without vLLM.

Installing megatron-papo into the server's environment (``pip install --no-deps``; setup.py declares
the ``vllm.general_plugins`` entry point) makes every vLLM process call ``register``; the server is then
started with ``--weight-transfer-config '{"backend": "megatron_papo"}'`` (tools/launch_vllm.sh
``--weight-sync broadcast``). Weights arrive as buckets (one broadcast each) and load through the
model's ``load_weights`` inside vLLM's layerwise reload, as with the built-in engines.

Every init and update carries the run's token (``sync_auth``): one without it is refused before the
engine joins a group or receives anything, so nothing is loaded.

Runs inside vLLM only: imports torch and vLLM, nothing of the trainer beyond ``weight_group`` and
``sync_auth``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from megatron_papo.rollout.sync_auth import check_token
from megatron_papo.rollout.weight_group import BACKEND, TensorMeta, WeightGroup, open_group, unpack


@dataclass(kw_only=True)
class BroadcastInitInfo(WeightTransferInitInfo):
    """Where the trainer's group meets (``master_address:master_port``), its size (1 + the server's
    workers), this server's first worker rank in it, the backend (gloo or nccl), and the run's token."""

    master_address: str
    master_port: int
    world_size: int
    rank_offset: int = 1
    backend: str = "nccl"
    timeout_s: float = 600.0
    token: str = ""


@dataclass(kw_only=True)
class BroadcastUpdateInfo(WeightTransferUpdateInfo):
    """One bucket: ``nbytes`` of ``uint8`` broadcast from the trainer, holding ``tensors``; the run's
    token."""

    nbytes: int
    tensors: list[TensorMeta]
    token: str = ""


class BroadcastWeightEngine(WeightTransferEngine[BroadcastInitInfo, BroadcastUpdateInfo]):
    """Receives bucket broadcasts from the trainer (rank 0) and loads them into the served model."""

    init_info_cls = BroadcastInitInfo
    update_info_cls = BroadcastUpdateInfo

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group: WeightGroup | None = None
        self.buffer_device = torch.device("cpu")

    def init_transfer_engine(self, init_info: BroadcastInitInfo) -> None:
        """Join the trainer's group: worker ``r`` of data-parallel replica ``d`` is rank
        ``rank_offset + d * workers_per_replica + r``."""
        check_token(init_info.token, "init_weight_transfer_engine")
        parallel = self.parallel_config
        rank = init_info.rank_offset + parallel.data_parallel_index * parallel.world_size + parallel.rank
        self.shutdown()
        self.group = open_group(
            init_info.master_address,
            init_info.master_port,
            rank,
            init_info.world_size,
            init_info.backend,
            init_info.timeout_s,
        )
        self.buffer_device = self.device if init_info.backend == "nccl" else torch.device("cpu")

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def receive_weights(self, update_info: BroadcastUpdateInfo) -> None:
        try:
            check_token(update_info.token, "update_weights")
            if self.group is None:
                raise RuntimeError(
                    "megatron_papo weight transfer: init_weight_transfer_engine was not called"
                )
            buffer = torch.empty(update_info.nbytes, dtype=torch.uint8, device=self.buffer_device)
            self.group.broadcast(buffer)
            self.model.load_weights(
                [(name, tensor.to(self.device)) for name, tensor in unpack(buffer, update_info.tensors)]
            )
        except BaseException:
            # vLLM ends the update on this error (a refused token, no group too) without finishing it,
            # which would leave the layers not reloaded yet on the meta device: finish it here (they get
            # their previous tensors back)
            self.finish_weight_update()
            raise

    def shutdown(self) -> None:
        self.group = None


def register() -> None:
    """vLLM general-plugin entry point: make backend ``megatron_papo`` known (idempotent: vLLM loads
    plugins in every process, possibly more than once)."""
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, BroadcastWeightEngine)
