"""DP scaling: one update with DP=2 (megatron DDP, two real processes) gives the DP=1 gradients.

Everything is the trainer's own machinery for one mini-batch (``Trainer._update``): a tiny random
Qwen2.5-VL built as ``Policy`` (megatron DDP + optimizer), prompts and masked images from the synthetic
task (``PromptSource``), ``build_sequences`` padded per rank, old / masked-image log-probs from the
forward-only schedule, then ``global_token_counts`` over the DP group, ``UpdateLoss`` and
``Policy.train_step``. The gradient compared is each parameter's ``main_grad`` (the DDP buffer after
the DP all-reduce); gradients, not updated weights, because Adam's first step hides a scale.

The global batch is 4 prompts x 2 responses = 8 sequences in micro-batches of 2; DP rank r takes the
contiguous half r (its own prompts, as the trainer's readers give them), so DP=1 runs micro-batches
{01, 23, 45, 67} and DP=2 runs {01, 23} and {45, 67}: the same set, and with ``global_token_mean`` off
(a mean per micro-batch, averaged by the schedule and DDP) the same objective. Response lengths differ
a lot, so per-micro-batch and per-rank means are far from the global token-mean. Each rank takes its
share in order (the trainer shuffles it first; the order only matters with the mean per micro-batch).
One process group per layout: each worker runs every setting from the same initial weights.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from multiprocess import run_distributed

from megatron_papo.models.tiny import make_tiny_qwen25vl

SEQUENCES, N = 8, 2  # 4 prompts x 2 responses
MICRO_BATCH = 2
# micro-batches hold 11, 8, 16 and 27 response tokens; rank 0 19, rank 1 43; rank 1 pads longer
RESPONSE_LENGTHS = (9, 2, 5, 3, 12, 4, 1, 26)
ADVANTAGES = (1.0, -1.0, 0.5, -0.6, 1.4, -1.2, -0.8, 0.9)
OLD_LP_NOISE = 0.4  # old = current + noise: ratios on both sides of the clip
PROGRESS = 0.5
# name -> (global_token_mean, masked_grad, micro-batch size; None: the rank's whole share in one)
SETTINGS = {
    "global": (True, False, MICRO_BATCH),
    "per_micro_batch": (False, False, MICRO_BATCH),
    "global_masked_grad": (True, True, MICRO_BATCH),
    "global_one_micro_batch": (True, False, None),
}
RTOL, ATOL = 1e-4, 1e-6
CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples/configs/tiny_cpu.yaml"
)


def _config(model: str, run_dir: str):
    from megatron_papo.config import load_train_config

    return load_train_config(
        CONFIG,
        [
            f"model.hf_path={model}",
            f"trainer.output_dir={run_dir}",
            "parallel.tensor_model_parallel_size=1",
            f"trainer.micro_batch_size={MICRO_BATCH}",
            "rollout.temperature=0.8",
            "data.synthetic.num_train=4",
            "data.synthetic.num_test=0",
            "algorithm.name=papo_g",
            "algorithm.gamma=0.2",  # the PAPO terms weigh enough to show in the gradient
            "algorithm.eta1=0.1",
            "algorithm.eta2=0.1",
            "algorithm.ref_kl_coef=0.0",
            # no clipping (it would rescale main_grad in place); grad_norm is still computed
            "optimizer.clip_grad=1.0e9",
            "optimizer.weight_decay=0.0",
        ],
    )


def _global_batch(cfg) -> dict:
    """The step's global batch, as the trainer's rollout leaves it: prompts with original and masked
    images, responses, advantages, and the per-token noise that turns current log-probs into old ones."""
    from megatron_papo.training.prompts import PromptSource

    source = PromptSource(
        cfg.model.hf_path, cfg.data, cfg.masking, cfg.reward, cfg.trainer.output_dir, dp_rank=0, dp_size=1
    )
    prompts = source.next_prompts(SEQUENCES // N)
    assert len(prompts) == SEQUENCES // N and all(p.pixel_values is not None for p in prompts)
    g = torch.Generator().manual_seed(3)
    return dict(
        prompts=[p.input_ids for p in prompts for _ in range(N)],
        pixel_values=[p.pixel_values for p in prompts for _ in range(N)],
        masked_pixel_values=[source.mask_images(p, 1) for p in prompts for _ in range(N)],
        image_grid_thw=[p.image_grid_thw for p in prompts for _ in range(N)],
        responses=[torch.randint(10, 400, (n,), generator=g) for n in RESPONSE_LENGTHS],
        noise=[OLD_LP_NOISE * torch.randn(n, generator=g) for n in RESPONSE_LENGTHS],
        advantages=torch.tensor(ADVANTAGES),
    )


def _update_worker(cfg, data: dict) -> dict:
    """This DP rank's half of the global batch through one update per setting, from the same weights.

    Returns per setting: every parameter's ``main_grad`` after ``train_step``, how far it moved during
    the optimizer step (0: the step left it as the reduction made it), the metrics averaged over ranks
    as the training loop does, and this rank's share of the response tokens.
    """
    import dataclasses

    from megatron.core import parallel_state as ps

    from megatron_papo.loop import average_over_ranks
    from megatron_papo.policy import Policy
    from megatron_papo.training.passes import log_prob_pass
    from megatron_papo.training.sequences import (
        TokenData,
        build_sequences,
        micro_batch_indices,
        padded_length,
        response_token_values,
        update_micro_batch,
    )
    from megatron_papo.training.update_loss import UpdateLoss, global_token_counts

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = range(dp_rank * SEQUENCES // dp_size, (dp_rank + 1) * SEQUENCES // dp_size)
    local = {k: v[mine.start : mine.stop] for k, v in data.items()}

    policy = Policy(cfg, total_optimizer_steps=1, with_ref=False, with_engine=False)
    temperature = cfg.rollout.temperature
    seqs = build_sequences(
        local["prompts"],
        local["responses"],
        local["pixel_values"],
        local["masked_pixel_values"],
        local["image_grid_thw"],
        local["advantages"],
        pad_id=policy.pad_token_id,
        length=padded_length(local["prompts"], local["responses"]),
        position_fn=policy.position_ids,
    )
    current = log_prob_pass(policy.model, seqs, MICRO_BATCH, temperature, masked=False)
    noise = response_token_values(local["prompts"], local["noise"], seqs.length)
    old_log_probs = current + noise
    masked_log_probs = log_prob_pass(policy.model, seqs, MICRO_BATCH, temperature, masked=True)

    named = [(name, p) for name, p in policy.model[0].named_parameters() if p.requires_grad]
    initial = {name: p.detach().clone() for name, p in named}
    pre_step: dict[str, torch.Tensor] = {}
    optimizer_step = policy.optimizer.step

    def step_and_record():  # main_grad as the optimizer receives it, to see that the step keeps it
        pre_step.update({name: p.main_grad.detach().clone() for name, p in named})
        return optimizer_step()

    policy.optimizer.step = step_and_record

    out = {"length": seqs.length, "tokens": float(seqs.loss_mask.sum()), "settings": {}}
    for setting, (global_mean, masked_grad, micro) in SETTINGS.items():
        with torch.no_grad():  # every setting starts from the same weights (the last step moved them)
            for name, p in named:
                p.copy_(initial[name])
        algo = dataclasses.replace(cfg.algorithm, global_token_mean=global_mean, masked_grad=masked_grad)
        seqs.token_data = TokenData(old_log_probs=old_log_probs)
        if not masked_grad:
            seqs.token_data.masked_log_probs = masked_log_probs
        # Trainer._update for one mini-batch: this rank's whole share, in order
        chunk = torch.arange(len(seqs))
        counts = None
        if algo.global_token_mean:
            counts = global_token_counts(algo, seqs.loss_mask[chunk], None, ps.get_data_parallel_group())
        batches = [
            update_micro_batch(seqs, idx, algo.masked_in_update)
            for idx in micro_batch_indices(chunk, micro or len(chunk))
        ]
        loss_fn = UpdateLoss(algo, temperature, PROGRESS, len(batches), dp_size, counts)
        pre_step.clear()
        metrics = policy.train_step(batches, loss_fn).metrics
        grads = {name: p.main_grad.detach().cpu().clone() for name, p in named}
        moved = max(float((p.main_grad - pre_step[name]).abs().max()) for name, p in named)
        weights_moved = max(float((p.detach() - initial[name]).abs().max()) for name, p in named)
        out["settings"][setting] = dict(
            num_microbatches=len(batches),
            grads=grads,
            grad_moved_in_step=moved,
            weights_moved=weights_moved,
            counts=counts,
            metrics=average_over_ranks(metrics),
        )
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DP=1 (one process) and DP=2 (two processes) on the same global batch, every setting each."""
    model = make_tiny_qwen25vl(str(tmp_path_factory.mktemp("model") / "tiny"))
    cfg = _config(model, str(tmp_path_factory.mktemp("run")))
    data = _global_batch(cfg)
    dp1 = run_distributed(_update_worker, 1, cfg, data)
    dp2 = run_distributed(_update_worker, 2, cfg, data)
    return dp1, dp2


def _assert_grads_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(
            b[name], a[name], rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


def _far(a: dict, b: dict) -> bool:
    """Some parameter's gradient differs well beyond the tolerance."""
    return any(not torch.allclose(b[n], a[n], rtol=100 * RTOL, atol=100 * ATOL) for n in a)


def test_the_batch_splits_as_intended(runs):
    dp1, (r0, r1) = runs
    assert r0["tokens"] + r1["tokens"] == dp1[0]["tokens"] == sum(RESPONSE_LENGTHS)
    assert r0["tokens"] != r1["tokens"]  # per-rank means differ from the global one
    assert r0["length"] < r1["length"] == dp1[0]["length"]  # each rank pads to its own longest
    for setting, (global_mean, _, _) in SETTINGS.items():
        counts = [r["settings"][setting]["counts"] for r in (dp1[0], r0, r1)]
        if global_mean:  # the all-reduced count is the global batch's on every rank
            assert all(c.response == sum(RESPONSE_LENGTHS) for c in counts)
        else:
            assert counts == [None, None, None]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_dp2_gradients_equal_dp1(runs, setting):
    dp1, dp2 = runs
    reference = dp1[0]["settings"][setting]["grads"]
    assert sum(float(g.abs().sum()) > 0 for g in reference.values()) > 0.9 * len(reference)
    for rank, result in enumerate(dp2):
        _assert_grads_close(reference, result["settings"][setting]["grads"], f"DP=2 rank {rank} vs DP=1:")


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_dp2_metrics_equal_dp1(runs, setting):
    """The loss metric averaged over micro-batches and ranks as the loop does, and the grad norm. The
    diagnostics (pg_loss, kl_prc) are means of per-micro-batch means: equal only when the micro-batches
    are the same ones (not for one micro-batch per rank: 8 sequences at DP=1, 4 at DP=2)."""
    dp1, dp2 = runs
    a, b = dp1[0]["settings"][setting]["metrics"], dp2[0]["settings"][setting]["metrics"]
    assert dp2[1]["settings"][setting]["metrics"] == b  # averaged over ranks: the same everywhere
    same_micro_batches = SETTINGS[setting][2] is not None
    keys = ("actor/loss", "actor/grad_norm") + (
        ("actor/pg_loss", "papo/kl_prc") if same_micro_batches else ()
    )
    for key in keys:
        assert math.isfinite(a[key]) and a[key] == pytest.approx(b[key], rel=RTOL, abs=ATOL), key
    assert a["actor/update_skipped"] == b["actor/update_skipped"] == 0.0


def test_global_token_mean_does_not_depend_on_micro_batching(runs):
    """With global_token_mean an update is one token-mean over the mini-batch however it is cut: micro-
    batches of 2 (DP=1: 4 of them, DP=2: 2 per rank) give the gradients and the averaged ``actor/loss``
    of the whole share in one micro-batch, where megatron-core averages over nothing at DP=1."""
    dp1, dp2 = runs
    whole = dp1[0]["settings"]["global_one_micro_batch"]
    assert whole["num_microbatches"] == 1
    assert [r["settings"]["global"]["num_microbatches"] for r in (dp1[0], *dp2)] == [4, 2, 2]
    for label, result in zip(("DP=1", "DP=2 rank 0", "DP=2 rank 1"), (dp1[0], *dp2), strict=True):
        what = f"{label}, micro-batches of {MICRO_BATCH} vs one micro-batch at DP=1:"
        _assert_grads_close(whole["grads"], result["settings"]["global"]["grads"], what)
        for setting in ("global", "global_masked_grad"):  # the same objective value, masked_grad or not
            loss = result["settings"][setting]["metrics"]["actor/loss"]
            assert loss == pytest.approx(whole["metrics"]["actor/loss"], rel=RTOL, abs=ATOL), (what, setting)


def test_main_grad_is_the_reduced_gradient(runs):
    """After train_step main_grad holds the DP-reduced gradient: the same on both ranks although their
    data differ, untouched by the optimizer step (no clipping), while the step did move the weights."""
    dp1, (r0, r1) = runs
    for setting in SETTINGS:
        for result in (dp1[0], r0, r1):
            s = result["settings"][setting]
            assert s["grad_moved_in_step"] == 0.0 and s["weights_moved"] > 0, setting
        a, b = r0["settings"][setting]["grads"], r1["settings"][setting]["grads"]
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-9)


def test_the_comparison_can_fail(runs):
    """The gradients depend on the weighting the test is about, at a far larger scale than the
    tolerance: global token-mean vs per micro-batch differ, and a DP=2 update that forgot the
    ``dp_size`` factor (half the gradient) or applied it twice would be caught."""
    dp1, (r0, _) = runs
    ref = dp1[0]["settings"]
    assert _far(ref["global"]["grads"], ref["per_micro_batch"]["grads"])
    assert _far(ref["global"]["grads"], ref["global_masked_grad"]["grads"])
    assert ref["global"]["metrics"]["actor/loss"] != pytest.approx(
        ref["per_micro_batch"]["metrics"]["actor/loss"], rel=1e-3
    )
    for setting in SETTINGS:
        grads = r0["settings"][setting]["grads"]
        for factor in (0.5, 2.0):
            scaled = {name: factor * g for name, g in grads.items()}
            assert _far(ref[setting]["grads"], scaled), (setting, factor)
