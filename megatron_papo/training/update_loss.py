"""The loss the update schedule runs on each micro-batch: the configured objective (``algorithm.objective``,
``megatron_papo.objectives``) plus the schedule's scaling.

megatron-core divides each micro-batch's loss by the number of micro-batches, and DDP averages gradients
over the data-parallel (DP) ranks. With ``global_token_mean`` each micro-batch's loss is a token SUM over
the whole mini-batch's counts (``TokenCounts``), so ``UpdateLoss`` multiplies it by
``num_microbatches * dp_size``: the summed gradients are then exactly those of one token-mean over the
mini-batch, and ``actor/loss`` averaged over micro-batches and ranks is that token-mean. Without it each
micro-batch is averaged on its own (the reference), and the schedule's averaging is what is wanted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_papo.objectives.pieces import TokenCounts, local_token_counts
from megatron_papo.objectives.registry import LossContext, LossInputs, Objective, build_objective
from megatron_papo.papo.config import AlgorithmConfig
from megatron_papo.parallel.device import current_device
from megatron_papo.training.sequences import MicroBatch


def global_token_counts(
    cfg: AlgorithmConfig,
    loss_mask: torch.Tensor,
    sft_weights: torch.Tensor | None,
    group: dist.ProcessGroup | None,
) -> TokenCounts:
    """``TokenCounts`` of one mini-batch over the DP ``group``: loss_mask [n, L] and sft_weights [n] are
    this rank's sequences of the mini-batch (a collective: every DP rank calls it)."""
    sums = local_token_counts(cfg, loss_mask, sft_weights).to(current_device())
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
    return TokenCounts.from_sums(sums.cpu())


@dataclass
class UpdateLoss:
    """``loss_fn(batch, logits)`` for ``Policy.train_step``: one optimizer step's micro-batches.

    ``counts``: the mini-batch's ``TokenCounts`` when ``algo.global_token_mean`` (else None). When the
    objective's ``masked_logits_in_update`` the logits [2b, s, vocab/tp] are the original then the masked
    images (``update_micro_batch``); packed, the logits [1, T, vocab/tp] hold one copy of the tokens or two.
    """

    algo: AlgorithmConfig
    temperature: float
    progress: float
    num_microbatches: int
    dp_size: int
    counts: TokenCounts | None = None
    objective: Objective | None = None  # the caller's, built once; else built from ``algo``

    def __post_init__(self) -> None:
        if self.algo.global_token_mean != (self.counts is not None):
            raise ValueError("UpdateLoss: pass counts exactly when algorithm.global_token_mean is on")
        if self.objective is None:
            self.objective = build_objective(self.algo)

    def __call__(self, batch: MicroBatch, output: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        copies = 2 if self.objective.masked_logits_in_update else 1
        if batch.packing is not None:
            parts = [batch.packing.copy(output, k) for k in range(copies)]
        else:
            parts = list(output.chunk(copies, dim=0))
        masked_logits = parts[1] if copies == 2 else None
        data = batch.token_data
        inputs = LossInputs(
            parts[0],
            batch.labels,
            batch.loss_mask,
            batch.advantages,
            data.old_log_probs,
            masked_logits=masked_logits,
            masked_log_probs=data.masked_log_probs,
            ref_log_probs=data.ref_log_probs,
            sft_weights=batch.sft_weights,
            rollout_is_weights=data.rollout_is_weights,
            packing=batch.packing,
        )
        ctx = LossContext(self.temperature, self.progress, self.counts)
        loss, metrics = self.objective.loss(inputs, ctx, batch.prepared)
        if self.counts is not None:  # undo the schedule's and DDP's averaging
            loss = loss * (self.num_microbatches * self.dp_size)
            metrics["actor/loss"] = loss.detach()
        return loss, {k: v.detach() for k, v in metrics.items()}
