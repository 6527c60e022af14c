"""The passes of an RL step over the policy, as functions the trainer, ``bench/step.py`` and tests share.

- ``log_prob_pass``: per-token log-probs of a step's sequences (original or masked images) through
  megatron-core's forward-only schedule, under the policy or the reference model;
- ``token_data_pass``: the step's ``TokenData`` the objective needs (old, masked, reference log-probs);
- ``update_pass``: ``ppo_epochs`` passes of shuffled mini-batch optimizer steps with ``UpdateLoss``, the
  objective's ``prepare`` run once per mini-batch (last pipeline stage) and sliced per micro-batch.

Per-token values live on the last pipeline stage only (empty elsewhere), on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_papo.objectives.registry import Objective, StepTokens
from megatron_papo.ops.vocab_parallel import log_probs_and_entropy
from megatron_papo.training.schedule import LossFn, run_schedule, tolerate_non_finite
from megatron_papo.training.sequences import (
    MicroBatch,
    StepSequences,
    micro_batch,
    micro_batch_indices,
    update_micro_batch,
)
from megatron_papo.training.update_loss import UpdateLoss, global_token_counts


@dataclass
class UpdateResult:
    """One optimizer step: its metrics (to log) and whether the update was skipped (to act on)."""

    metrics: dict[str, float]
    skipped: bool


TrainStep = Callable[[list[MicroBatch], LossFn], UpdateResult]


def token_log_probs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (log-prob of ``labels``, entropy), both [b, s], of ``softmax(logits / temperature)``.

    logits: [b, s, vocab/tp] (vocab-parallel, never gathered); labels: [b, s].
    """
    b, s, v = logits.shape
    lp, entropy = log_probs_and_entropy(logits.reshape(b * s, v), labels.reshape(b * s), temperature)
    return lp.view(b, s), entropy.view(b, s)


def log_prob_pass(
    model: list[torch.nn.Module], seqs: StepSequences, micro_batch_size: int, temperature: float, masked: bool
) -> torch.Tensor:
    """Per-token log-probs [N, L] of ``seqs`` under ``model`` (its chunks), with the masked images when
    ``masked``; NaN where the model diverged (the update's loss is then NaN and the step skipped)."""
    order = torch.arange(len(seqs))
    batches = [micro_batch(seqs, idx, masked=masked) for idx in micro_batch_indices(order, micro_batch_size)]

    def loss_fn(batch: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
        lp, _ = token_log_probs(logits, batch.labels, temperature)
        return torch.zeros(()), {"log_probs": lp.detach()}

    def diverged(batch: MicroBatch) -> dict:
        return {"log_probs": torch.full(batch.labels.shape, math.nan)}

    outputs = run_schedule(model, batches, tolerate_non_finite(loss_fn, diverged), forward_only=True)
    if not outputs:
        return torch.empty(0)
    return torch.cat([o["log_probs"] for o in outputs]).cpu()


def token_data_pass(
    model: list[torch.nn.Module],
    ref_model: list[torch.nn.Module],
    objective: Objective,
    seqs: StepSequences,
    micro_batch_size: int,
    temperature: float,
) -> None:
    """Fill ``seqs.token_data`` (last pipeline stage) with what ``objective`` needs: old log-probs,
    masked-image log-probs (PAPO's reference default, VPPO) and the reference model's."""
    data = seqs.token_data
    old = log_prob_pass(model, seqs, micro_batch_size, temperature, masked=False)
    masked = ref = None
    if objective.masked_log_probs_needed:
        masked = log_prob_pass(model, seqs, micro_batch_size, temperature, masked=True)
    if objective.ref_log_probs_needed:
        ref = log_prob_pass(ref_model, seqs, micro_batch_size, temperature, masked=False)
    if ps.is_pipeline_last_stage():
        data.old_log_probs, data.masked_log_probs, data.ref_log_probs = old, masked, ref


def update_pass(
    train_step: TrainStep,
    objective: Objective,
    seqs: StepSequences,
    *,
    sequences_per_update: int,
    micro_batch_size: int,
    ppo_epochs: int,
    temperature: float,
    progress: float,
    generator: torch.Generator,
) -> list[UpdateResult]:
    """``ppo_epochs`` passes over ``seqs`` (this DP rank's) in shuffled mini-batches of
    ``sequences_per_update``, one ``train_step`` each; ``progress`` in [0, 1] drives gamma annealing."""
    if len(seqs) % sequences_per_update:
        raise ValueError(f"{len(seqs)} sequences do not split into mini-batches of {sequences_per_update}")
    dp_group = ps.get_data_parallel_group()
    dp_size = dist.get_world_size(dp_group)
    algo = objective.cfg
    results = []
    for _ in range(ppo_epochs):
        order = torch.randperm(len(seqs), generator=generator)
        for chunk in order.split(sequences_per_update):
            batches = [
                update_micro_batch(seqs, idx, objective.masked_logits_in_update)
                for idx in micro_batch_indices(chunk, micro_batch_size)
            ]
            _attach_prepared(objective, seqs, chunk, batches, micro_batch_size, dp_group)
            counts = None
            if algo.global_token_mean:
                sft = seqs.sft_weights[chunk] if seqs.sft_weights is not None else None
                counts = global_token_counts(algo, seqs.loss_mask[chunk], sft, dp_group)
            loss_fn = UpdateLoss(algo, temperature, progress, len(batches), dp_size, counts, objective)
            results.append(train_step(batches, loss_fn))
    return results


def _attach_prepared(
    objective: Objective,
    seqs: StepSequences,
    chunk: torch.Tensor,
    batches: list[MicroBatch],
    micro_batch_size: int,
    dp_group: dist.ProcessGroup,
) -> None:
    """The objective's ``prepare`` over one mini-batch's rows ``chunk`` [n] (last pipeline stage: a
    collective over its DP group), each micro-batch given its rows as ``batch.prepared``."""
    if not ps.is_pipeline_last_stage():
        return
    data = seqs.token_data
    masked = data.masked_log_probs[chunk] if data.masked_log_probs is not None else None
    tokens = StepTokens(seqs.loss_mask[chunk], seqs.advantages[chunk], data.old_log_probs[chunk], masked)
    prepared = objective.prepare(tokens, micro_batch_size, dp_group)
    if prepared is None:
        return
    for j, batch in enumerate(batches):
        batch.prepared = prepared.select(torch.arange(j * micro_batch_size, (j + 1) * micro_batch_size))
