"""The policy being trained: its megatron-core model shards, optimizer, reference model and rollout engine."""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from transformers import AutoConfig

from megatron_papo.config import TrainConfig
from megatron_papo.models import build_model, load_hf_weights, mrope_position_ids
from megatron_papo.models.weight_stream import WeightStream
from megatron_papo.models.weights import export_stream
from megatron_papo.parallel.device import current_device
from megatron_papo.rollout.embedded import EmbeddedEngine
from megatron_papo.rollout.engine import RolloutEngine
from megatron_papo.training.optimizer import build_optimizer, distributed_optimizer_enabled
from megatron_papo.training.passes import UpdateResult
from megatron_papo.training.schedule import LossFn, run_schedule, tolerate_non_finite
from megatron_papo.training.sequences import MicroBatch


def build_rollout_engine(cfg: TrainConfig, eos_token_id: int, pad_token_id: int) -> RolloutEngine:
    """The configured rollout engine: in-process transformers (default) or vLLM servers."""
    if cfg.rollout.backend == "vllm":
        from megatron_papo.rollout.vllm import VllmEngine

        return VllmEngine.from_config(cfg)
    return EmbeddedEngine(cfg.model.hf_path, cfg.rollout, eos_token_id, pad_token_id, device=current_device())


class Policy:
    """This rank's shard of the policy (one model chunk per pipeline stage), wrapped in megatron DDP."""

    def __init__(
        self,
        cfg: TrainConfig,
        total_optimizer_steps: int | None,
        with_ref: bool = False,
        with_engine: bool = True,
    ) -> None:
        """``total_optimizer_steps`` None: inference only (no DDP wrapper, no optimizer)."""
        self.cfg = cfg
        self.hf_config = AutoConfig.from_pretrained(cfg.model.hf_path)
        model = self._build_loaded()
        self.model: list[torch.nn.Module] = [model]
        self.optimizer = self.scheduler = None
        if total_optimizer_steps is not None:
            ddp_config = DistributedDataParallelConfig(
                use_distributed_optimizer=distributed_optimizer_enabled(cfg.optimizer),
                grad_reduce_in_fp32=True,
            )
            self.model = [DistributedDataParallel(model.config, ddp_config, model)]
            model.config.finalize_model_grads_func = finalize_model_grads
            self.optimizer, self.scheduler = build_optimizer(cfg.optimizer, self.model, total_optimizer_steps)
        self.module = model
        self.ref_model: list[torch.nn.Module] = []
        if with_ref:
            ref = self._build_loaded().eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            self.ref_model = [ref]
        text = self.hf_config.get_text_config()
        self.eos_token_id = int(getattr(self.hf_config, "eos_token_id", None) or text.eos_token_id)
        self.pad_token_id = int(getattr(text, "pad_token_id", None) or self.eos_token_id)
        self.engine = build_rollout_engine(cfg, self.eos_token_id, self.pad_token_id) if with_engine else None

    def _build_loaded(self) -> torch.nn.Module:
        model = build_model(
            self.cfg.model, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
        )
        load_hf_weights(model, self.cfg.model.hf_path)
        return model.to(current_device())

    def position_ids(
        self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Multimodal RoPE positions [3, b, s] of ``input_ids`` [b, s], as transformers computes them."""
        return mrope_position_ids(input_ids, image_grid_thw, attention_mask, self.hf_config)

    def train_step(self, batches: list[MicroBatch], loss_fn: LossFn) -> UpdateResult:
        """One optimizer step over ``batches``: averaged loss metrics (last stage), grad norm and LR.

        A non-finite loss or a NaN / inf gradient on any rank skips the step on every rank
        (``UpdateResult.skipped``; the metric ``actor/nonfinite_grad`` says which): megatron-core steps
        on such gradients in bf16 without a loss scale (a NaN norm clips nothing).
        """
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        finite: list[torch.Tensor] = []  # kept on the device: no host sync inside the schedule
        guarded = tolerate_non_finite(loss_fn, lambda batch: {})

        def recorded(batch: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
            loss, outputs = guarded(batch, logits)
            finite.append(torch.isfinite(loss.detach()))
            return loss, outputs

        outputs = run_schedule(self.model, batches, recorded, forward_only=False)
        loss_ok = torch.stack(finite).all() if finite else torch.tensor(True)
        bad = torch.stack([~loss_ok.to(current_device()), ~self._grads_finite()]).float()
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        metrics = {
            k: sum(float(o.get(k, math.nan)) for o in outputs) / len(outputs) for k in set().union(*outputs)
        }
        metrics["actor/nonfinite_grad"] = float(bad[1])
        if bad.any():  # the gradients are left as they are: the next step zeroes them first
            return UpdateResult(metrics | {"actor/update_skipped": 1.0}, skipped=True)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics["actor/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["actor/lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["actor/update_skipped"] = float(not ok)
        return UpdateResult(metrics, skipped=not ok)

    def _grads_finite(self) -> torch.Tensor:
        """Whether this rank's reduced gradients (megatron DDP's grad buffers) are all finite: a bool
        tensor on the device (one host sync for the whole step, in ``train_step``)."""
        buffers = [b for chunk in self.model for b in chunk.buffers + chunk.expert_parallel_buffers]
        flags = [torch.isfinite(b.grad_data).all() for b in buffers]
        return torch.stack(flags).all() if flags else torch.tensor(True, device=current_device())

    def export_hf(self, to: str) -> WeightStream:
        """The current weights (HF names) streamed to global rank 0 or every rank (``to``: ``rank0`` /
        ``all``, ``weights.export_stream``); a collective: every rank must iterate."""
        return export_stream(self.module, to=to)

    def sync_rollout_weights(self, version: int = 0) -> None:
        """The current weights into the rollout engine, tagged ``version`` (the optimizer steps behind them:
        stamped on the rollouts generated with them); a collective."""
        if self.engine is None:
            for _ in self.export_hf("rank0").pieces:  # still take part in the gathers
                pass
            return
        self.engine.sync_weights(self.export_hf(self.engine.weights_to))
        self.engine.weight_version = version
