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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_papo.objectives.registry import Objective, StepTokens
from megatron_papo.ops.vocab_parallel import log_probs_and_entropy
from megatron_papo.training.packing import Packing, flat_tokens, token_rows
from megatron_papo.training.schedule import LossFn, run_schedule, tolerate_non_finite
from megatron_papo.training.sequences import (
    MicroBatch,
    StepSequences,
    micro_batch,
    micro_batches,
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
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, packing: Packing | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (log-prob of ``labels``, entropy), both [b, s], of ``softmax(logits / temperature)``.

    logits: [b, s, vocab/tp] (vocab-parallel, never gathered), or the packed model output [1, T, vocab/tp]
    of ``packing``'s sequences (values 0 on padding); labels: [b, s].
    """
    rows, targets = flat_tokens(logits if packing is None else packing.copy(logits, 0), labels, packing)
    lp, entropy = log_probs_and_entropy(rows, targets, temperature)
    return token_rows(lp, labels.shape, packing), token_rows(entropy, labels.shape, packing)


def log_prob_passes(
    model: list[torch.nn.Module],
    seqs: StepSequences,
    variants: Sequence[bool],
    micro_batch_size: int,
    temperature: float,
    *,
    packed: bool = False,
    max_tokens: int = 0,
) -> list[torch.Tensor]:
    """Per-token log-probs [N, L] of ``seqs`` under ``model`` (its chunks), one tensor per entry of
    ``variants`` (True: with the masked images), all in ONE schedule call (one pipeline fill and drain);
    micro-batches as ``micro_batches`` cuts them, packed when ``packed``. NaN where the model diverged
    (the update's loss is then NaN and the step skipped); empty off the last pipeline stage."""
    rows = micro_batches(seqs, torch.arange(len(seqs)), micro_batch_size, max_tokens, packed)
    batches = [micro_batch(seqs, idx, masked=masked, packed=packed) for masked in variants for idx in rows]

    def loss_fn(batch: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
        lp, _ = token_log_probs(logits, batch.labels, temperature, batch.packing)
        return torch.zeros(()), {"log_probs": lp.detach()}

    def diverged(batch: MicroBatch) -> dict:
        return {"log_probs": torch.full(batch.labels.shape, math.nan)}

    outputs = run_schedule(model, batches, tolerate_non_finite(loss_fn, diverged), forward_only=True)
    if not outputs:
        return [torch.empty(0) for _ in variants]
    results = []
    for k in range(len(variants)):
        out = torch.empty(len(seqs), seqs.length)
        for idx, o in zip(rows, outputs[k * len(rows) : (k + 1) * len(rows)], strict=True):
            out[idx] = o["log_probs"].cpu()
        results.append(out)
    return results


def log_prob_pass(
    model: list[torch.nn.Module], seqs: StepSequences, micro_batch_size: int, temperature: float, masked: bool
) -> torch.Tensor:
    """``log_prob_passes`` with one variant: the original images, or the masked ones when ``masked``."""
    return log_prob_passes(model, seqs, [masked], micro_batch_size, temperature)[0]


def token_data_pass(
    model: list[torch.nn.Module],
    ref_model: list[torch.nn.Module],
    objective: Objective,
    seqs: StepSequences,
    micro_batch_size: int,
    temperature: float,
    *,
    packed: bool = False,
    max_tokens: int = 0,
    on_policy: bool = False,
) -> None:
    """Fill ``seqs.token_data`` (last pipeline stage) with what ``objective`` needs: old log-probs,
    masked-image log-probs (PAPO's reference default, VPPO) and the reference model's. The old and the
    masked ones come from one schedule call. ``on_policy`` (one epoch, one mini-batch, and nothing reads
    them before the update): no old log-probs, the update's own forward stands in for them
    (``token_stats``); ``packed`` / ``max_tokens``: the micro-batches (``micro_batches``)."""
    data = seqs.token_data
    need_old = not on_policy or objective.old_log_probs_in_prepare or data.rollout_log_probs is not None
    variants = [False] * need_old + [True] * objective.masked_log_probs_needed
    batching = dict(packed=packed, max_tokens=max_tokens)
    policy = log_prob_passes(model, seqs, variants, micro_batch_size, temperature, **batching)
    old = policy.pop(0) if need_old else None
    masked = policy.pop(0) if objective.masked_log_probs_needed else None
    ref = None
    if objective.ref_log_probs_needed:
        ref = log_prob_passes(ref_model, seqs, [False], micro_batch_size, temperature, **batching)[0]
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
    packed: bool = False,
    max_tokens: int = 0,
) -> list[UpdateResult]:
    """``ppo_epochs`` passes over ``seqs`` (this DP rank's) in shuffled mini-batches of
    ``sequences_per_update``, one ``train_step`` each; ``progress`` in [0, 1] drives gamma annealing;
    ``packed`` / ``max_tokens``: the micro-batches (``micro_batches``; a doubled ``masked_grad``
    micro-batch counts its tokens twice)."""
    if len(seqs) % sequences_per_update:
        raise ValueError(f"{len(seqs)} sequences do not split into mini-batches of {sequences_per_update}")
    dp_group = ps.get_data_parallel_group()
    dp_size = dist.get_world_size(dp_group)
    algo = objective.cfg
    copies = 2 if objective.masked_logits_in_update else 1
    prepare_size = 1 if max_tokens else micro_batch_size
    results = []
    for _ in range(ppo_epochs):
        order = torch.randperm(len(seqs), generator=generator)
        for chunk in order.split(sequences_per_update):
            rows = micro_batches(seqs, chunk, micro_batch_size, max_tokens // copies, packed)
            batches = [update_micro_batch(seqs, idx, copies == 2, packed) for idx in rows]
            _attach_prepared(objective, seqs, rows, batches, prepare_size, dp_group)
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
    rows: list[torch.Tensor],
    batches: list[MicroBatch],
    micro_batch_size: int,
    dp_group: dist.ProcessGroup,
) -> None:
    """The objective's ``prepare`` over one mini-batch's micro-batches ``rows`` (each [b] sequence
    indices; last pipeline stage: a collective over its DP group), each micro-batch given its rows as
    ``batch.prepared``; ``micro_batch_size``: what ``prepare`` is told (1 with token-budget micro-batches,
    whose sizes vary)."""
    if not ps.is_pipeline_last_stage():
        return
    chunk = torch.cat(rows)
    data = seqs.token_data
    masked = data.masked_log_probs[chunk] if data.masked_log_probs is not None else None
    old = data.old_log_probs[chunk] if data.old_log_probs is not None else None
    tokens = StepTokens(seqs.loss_mask[chunk], seqs.advantages[chunk], old, masked)
    prepared = objective.prepare(tokens, micro_batch_size, dp_group)
    if prepared is None:
        return
    ends = torch.tensor([len(r) for r in rows]).cumsum(0).tolist()
    for batch, start, end in zip(batches, [0, *ends[:-1]], ends, strict=True):
        batch.prepared = prepared.select(torch.arange(start, end))
