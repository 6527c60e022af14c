"""AdamW through megatron-core (distributed optimizer, grad clipping across TP/PP) and its LR schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import MegatronModule

from megatron_papo.config_io import check_choices


@dataclass
class OptimizerConfig:
    """The ``optimizer`` section. Reference recipe: AdamW lr 1e-6 constant, wd 1e-2, grad clip 1.0."""

    lr: float = 1e-6
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # None: on when apex or transformer-engine provides the fused Adam. With torch's own Adam, megatron-core
    # 0.16's distributed optimizer cannot reload its checkpoints (per-parameter "step" state), so it is off.
    use_distributed_optimizer: bool | None = None
    bf16: bool = False

    def __post_init__(self) -> None:
        check_choices(self, "optimizer")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(
                f"optimizer: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}"
            )
        if self.warmup_steps < 0 or self.clip_grad < 0 or self.weight_decay < 0:
            raise ValueError("optimizer: warmup_steps, clip_grad and weight_decay must be >= 0")


def distributed_optimizer_enabled(cfg: OptimizerConfig) -> bool:
    """Whether to shard optimizer state over DP (the DDP wrapper must be built with the same choice)."""
    if cfg.use_distributed_optimizer is not None:
        return cfg.use_distributed_optimizer
    from megatron.core.optimizer import distrib_optimizer

    return distrib_optimizer.HAVE_APEX_OR_TE


def build_optimizer(cfg: OptimizerConfig, model: list[MegatronModule], total_steps: int):
    """megatron-core's optimizer over the DDP-wrapped ``model`` chunks and a scheduler stepping per update."""
    optimizer = get_megatron_optimizer(
        McoreOptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=cfg.adam_eps,
            clip_grad=cfg.clip_grad,
            use_distributed_optimizer=distributed_optimizer_enabled(cfg),
            bf16=cfg.bf16,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=max(total_steps, cfg.warmup_steps + 1),
        lr_decay_style=cfg.lr_schedule,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler
