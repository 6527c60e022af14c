"""Micro-batches through megatron-core's pipeline schedules: the one way the trainer runs the policy.

``run_schedule`` feeds a list of ``MicroBatch``es to ``get_forward_backward_func`` (no pipelining,
1F1B or interleaved, as megatron-core picks for the layout). The caller's ``loss_fn(batch, logits)``
runs on the last pipeline stage with vocab-parallel logits ``[b, s, vocab/tp]`` and returns
``(loss, outputs)``; the schedule divides ``loss`` by the number of micro-batches before backward, so
callers that normalise by a global count multiply it back (see ``trainer``). ``outputs`` of every
micro-batch come back, in order, on the last stage (an empty list elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_papo.ops.vocab_parallel import NonFiniteError
from megatron_papo.parallel.device import current_device
from megatron_papo.training.sequences import MicroBatch

LossFn = Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]


def _forward_step(loss_fn: LossFn, data_iterator, model):
    batch: MicroBatch = next(data_iterator).to(current_device())
    output = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        packed_seq_params=batch.packing.params() if batch.packing is not None else None,
    )
    return output, partial(_detached_outputs, loss_fn, batch)


def _detached_outputs(loss_fn: LossFn, batch: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``loss_fn`` with tensor outputs copied: megatron-core scales the returned loss in place
    (``/= num_microbatches``), which would change a ``loss.detach()`` metric sharing its storage."""
    loss, outputs = loss_fn(batch, logits)
    return loss, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in outputs.items()}


def tolerate_non_finite(loss_fn: LossFn, fallback: Callable[[MicroBatch], dict[str, Any]]) -> LossFn:
    """``loss_fn`` that answers NaN / inf inputs (``NonFiniteError``, raised alike on every TP rank) with a
    NaN loss and ``fallback(batch)`` outputs instead of an exception, so every pipeline stage finishes the
    schedule and the step can be skipped together (``Policy.train_step``)."""

    def wrapped(batch: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        try:
            return loss_fn(batch, logits)
        except NonFiniteError:
            return logits.sum() * float("nan"), fallback(batch)

    return wrapped


def run_schedule(
    model: list[torch.nn.Module], batches: list[MicroBatch], loss_fn: LossFn, forward_only: bool
) -> list[dict[str, Any]]:
    """Run ``batches`` through ``model`` chunks: each with input_ids [b, s], the same b and s for all, or
    all packed ([1, T], T varying: the pipeline's activations then carry their shapes, see
    ``models.config.language_config``)."""
    if not batches:
        return []
    b, s = batches[0].input_ids.shape
    packed = batches[0].packing is not None
    if any((x.packing is not None) != packed for x in batches):
        raise ValueError("a schedule's micro-batches must be all packed or all padded")
    if not packed and any(x.input_ids.shape != (b, s) for x in batches):
        raise ValueError("pipeline schedules need every micro-batch to have the same [batch, seq] shape")
    context = torch.no_grad() if forward_only else torch.enable_grad()
    with context:
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, loss_fn),
            data_iterator=iter(batches),
            model=model,
            num_microbatches=len(batches),
            seq_length=max(x.input_ids.shape[1] for x in batches),
            micro_batch_size=b,
            forward_only=forward_only,
        )
