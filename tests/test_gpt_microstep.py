"""One training micro-step of a megatron-core GPTModel with the PAPO loss: TP=2 x PP=2 equals TP=1 x PP=1.
(``tests/test_objectives.py`` runs the same step with the other objectives.)

Weights reach the TP=2 x PP=2 layout by megatron-core's own resharding (``dist_checkpointing`` save at
TP=1, load at TP=2 x PP=2), and the TP=2 x PP=2 gradients come back to the TP=1 layout the same way.
The "masked image" is a perturbed prompt, fed as the second half of a doubled micro-batch (as the trainer
does with ``masked_grad``), so gradients flow through both the original and the masked branch.
"""

import dataclasses
import os
from functools import partial

import torch
from multiprocess import run_distributed
from tiny_gpt import tiny_gpt

from megatron_papo.objectives.registry import StepTokens, build_objective
from megatron_papo.papo.config import AlgorithmConfig
from megatron_papo.training.sequences import MicroBatch, TokenData
from megatron_papo.training.update_loss import UpdateLoss, global_token_counts

SEQ, VOCAB, PROMPT = 12, 64, 4
RESPONSE_LENGTHS = (7, 3, 6, 2)  # micro-batches of 2 hold 10 and 8 response tokens
TEMPERATURE, PROGRESS = 0.7, 0.3
CFG = AlgorithmConfig(
    name="papo_g",
    gamma=0.2,
    eta1=0.1,
    eta2=0.1,
    masked_grad=True,
    kl_prc_estimator="exact",
    entropy_estimator="exact",
    global_token_mean=True,
)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    n = len(RESPONSE_LENGTHS)
    tokens = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    masked = tokens.clone()
    masked[:, :PROMPT] = torch.randint(0, VOCAB, (n, PROMPT), generator=g)  # the "masked image"
    loss_mask = torch.zeros(n, SEQ)
    for i, length in enumerate(RESPONSE_LENGTHS):
        loss_mask[i, PROMPT - 1 : PROMPT - 1 + length] = 1  # logits[t] scores tokens[t + 1]
    return dict(
        tokens=tokens,
        masked_tokens=masked,
        labels=tokens.roll(-1, dims=1),
        loss_mask=loss_mask,
        advantages=torch.randn(n, generator=g),
        old_log_probs=-4.0 + 0.3 * torch.randn(n, SEQ, generator=g),  # ratios on both sides of the clip
        ref_log_probs=-4.0 + 0.3 * torch.randn(n, SEQ, generator=g),
        masked_log_probs=-4.0 + 0.5 * torch.randn(n, SEQ, generator=g),  # the step's no-grad masked pass
    )


def _model():
    return tiny_gpt(VOCAB, SEQ, tied=False)


def _loss_fn(cfg, batch, counts, num_microbatches, output):
    """The trainer's loss (``UpdateLoss``): vocab-parallel logits (original then masked halves when the
    objective doubles micro-batches). No DDP here (every rank runs the whole batch): dp_size 1."""
    loss_fn = UpdateLoss(cfg, TEMPERATURE, PROGRESS, num_microbatches, 1, counts)
    loss, metrics = loss_fn(batch, output)
    return loss, metrics | {"loss": metrics["actor/loss"] / (num_microbatches if counts else 1)}


def _forward_step(cfg, counts, num_microbatches, data_iterator, model):
    batch = next(data_iterator)
    positions = torch.arange(SEQ).expand_as(batch.input_ids)
    output = model(batch.input_ids, positions, None)
    return output, partial(_loss_fn, cfg, batch, counts, num_microbatches)


def _micro_batch(batch: dict[str, torch.Tensor], rows: torch.Tensor, doubled: bool) -> MicroBatch:
    """Rows ``rows`` of ``batch`` as the trainer's ``MicroBatch``; ``doubled``: the tokens, then the
    "masked" tokens (``update_micro_batch``'s layout)."""
    tokens = batch["tokens"][rows]
    if doubled:
        tokens = torch.cat([tokens, batch["masked_tokens"][rows]])
    return MicroBatch(
        input_ids=tokens,
        attention_mask=torch.ones_like(tokens),
        position_ids=torch.arange(SEQ).expand(3, *tokens.shape),
        pixel_values=None,
        image_grid_thw=None,
        labels=batch["labels"][rows],
        loss_mask=batch["loss_mask"][rows],
        advantages=batch["advantages"][rows],
        token_data=TokenData(
            old_log_probs=batch["old_log_probs"][rows],
            masked_log_probs=batch["masked_log_probs"][rows],
            ref_log_probs=batch["ref_log_probs"][rows],
        ),
    )


def _step(model, cfg: AlgorithmConfig, micro_batch_size: int) -> list[dict]:
    """Forward + backward of the whole batch in micro-batches through megatron-core's schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch = _batch()
    n = len(RESPONSE_LENGTHS)
    rows = torch.arange(n).split(micro_batch_size)
    objective = build_objective(cfg)
    micro = [_micro_batch(batch, r, objective.masked_logits_in_update) for r in rows]
    tokens = StepTokens(
        batch["loss_mask"], batch["advantages"], batch["old_log_probs"], batch["masked_log_probs"]
    )
    prepared = objective.prepare(tokens, micro_batch_size, None)  # every rank runs the whole batch
    if prepared is not None:
        for m, r in zip(micro, rows, strict=True):
            m.prepared = prepared.select(r)
    counts = global_token_counts(cfg, batch["loss_mask"], None, None) if cfg.global_token_mean else None
    model.zero_grad(set_to_none=True)
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, cfg, counts, len(micro)),
        data_iterator=iter(micro),
        model=[model],
        num_microbatches=len(micro),
        seq_length=SEQ,
        micro_batch_size=(2 if objective.masked_logits_in_update else 1) * micro_batch_size,
        forward_only=False,
    )


def _params_sharded(model, use_grads: bool) -> dict:
    """The model's sharded state dict, parameters only, holding each parameter's gradient (or zeros to
    load gradients into)."""
    params = {id(p): p for p in model.parameters()}
    out = {}
    for key, sharded in model.sharded_state_dict().items():
        param = params.get(id(getattr(sharded, "data", None)))
        if param is not None:
            sharded.data = param.grad if use_grads else torch.zeros_like(param)
            out[key] = sharded
    return out


def _relayout(tp: int, pp: int) -> None:
    from megatron.core import parallel_state as ps

    from megatron_papo.parallel.initialize import set_seed

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    set_seed(1234)


def _run(root: str, cfg: AlgorithmConfig = CFG):
    """From TP=1 x PP=1: the reference steps, then TP=2 x PP=2, then back to TP=1 x PP=1."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    weights_dir, grads_dir = os.path.join(root, "weights"), os.path.join(root, "grads")
    if dist.get_rank() == 0:
        os.makedirs(weights_dir)
        os.makedirs(grads_dir)
    dist.barrier()

    # TP=1 x PP=1 (x DP=4, every rank the same): the reference, and the global token-mean check
    model = _model()
    one_batch = _step(model, cfg, len(RESPONSE_LENGTHS))
    one_batch_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    reference_mean = _step(model, dataclasses.replace(cfg, global_token_mean=False), 2)
    reference_mean_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    single = _step(model, cfg, 2)
    single_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    dist_checkpointing.save(model.sharded_state_dict(), weights_dir)

    # TP=2 x PP=2 on the resharded weights
    _relayout(2, 2)
    model = _model()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), weights_dir))
    parallel = _step(model, cfg, 2)
    last_stage = ps.is_pipeline_last_stage()
    dist_checkpointing.save(_params_sharded(model, use_grads=True), grads_dir)

    # back to TP=1 x PP=1 to read the TP=2 x PP=2 gradients in the reference layout
    _relayout(1, 1)
    model = _model()
    parallel_grads = dist_checkpointing.load(_params_sharded(model, use_grads=False), grads_dir)
    return dict(
        single=single,
        single_grads=single_grads,
        one_batch=one_batch,
        one_batch_grads=one_batch_grads,
        reference_mean=reference_mean,
        reference_mean_grads=reference_mean_grads,
        parallel=parallel if last_stage else None,
        parallel_grads=parallel_grads,
    )


def _total(outputs: list[dict]) -> float:
    return sum(float(o["loss"]) for o in outputs)


def check_microstep(per_rank: list[dict]) -> None:
    """``_run``'s results: the global token-mean is exact, and TP=2 x PP=2 equals TP=1 x PP=1."""
    ref = per_rank[0]
    names = sorted(ref["single_grads"])
    assert names and all(float(ref["single_grads"][k].abs().sum()) > 0 for k in names)

    # one micro-batch of 4 == two micro-batches of 2 (10 and 8 tokens): the token-mean is global
    assert abs(_total(ref["one_batch"]) - _total(ref["single"])) < 1e-5
    for k in names:
        torch.testing.assert_close(ref["single_grads"][k], ref["one_batch_grads"][k], rtol=1e-4, atol=1e-6)
    # the reference's per-micro-batch mean is not the same objective
    assert (
        max(float((ref["reference_mean_grads"][k] - ref["single_grads"][k]).abs().max()) for k in names)
        > 1e-4
    )

    # TP=2 x PP=2 (ranks 2, 3 are the last stage) == TP=1 x PP=1, loss, metrics and every gradient
    for rank in (2, 3):
        parallel = per_rank[rank]["parallel"]
        assert len(parallel) == 2
        for ours, theirs in zip(parallel, ref["single"], strict=True):
            assert ours.keys() == theirs.keys()
            for key in theirs:
                torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)
    for result in per_rank:
        assert sorted(result["parallel_grads"]) == names
        for k in names:
            torch.testing.assert_close(
                result["parallel_grads"][k], ref["single_grads"][k], rtol=1e-4, atol=1e-6, msg=k
            )


def test_tp2_pp2_microstep_equals_tp1_and_global_token_mean_is_exact(tmp_path):
    check_microstep(run_distributed(_run, 4, str(tmp_path), tp=1, pp=1))
