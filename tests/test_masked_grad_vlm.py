"""``algorithm.masked_grad: true`` end to end through the Qwen2.5-VL policy with real pixel values.

Policy side (what the trainer runs): a tiny random Qwen2.5-VL HF directory loaded into ``Policy`` (the
megatron-core model, DDP-wrapped), two real images encoded by ``encode_prompt`` and masked by
``ImageMasker`` (``raw_grid``, the reference masking), two responses per prompt laid out by
``build_sequences``, micro-batches of two sequences (one per prompt) from ``update_micro_batch``, and
megatron-core's schedule (``run_schedule``) with ``UpdateLoss`` as the loss. Two configurations: PAPO-G
with ``masked_grad=True`` (the doubled original + masked micro-batch, one forward) and the reference
default (``masked_grad=False``: masked log-probs precomputed by a forward-only pass, no gradient). eta1 and
the ref-KL term are off, so the masked image reaches the loss only through KL_prc and the masked entropy.
Layouts: TP=2 (DP=1, two micro-batches per step) and TP=1 x DP=2 (one micro-batch per rank), in one spawn.

Reference (written here from ``../shared/papo-spec.md``, not from ``papo/loss.py``): transformers' own
``Qwen2_5_VLForConditionalGeneration`` from the same directory in float64, one forward per sequence with
the original and with the masked pixel values (no padding), log-softmax at the temperature, and the loss
per micro-batch (token-mean) averaged over the micro-batches, as the schedule does. Its gradients with
lp_mask differentiable and with lp_mask detached are compared, by HF name, with the policy's gradients
exported through the project's HF weight mapping; their difference (the masked branch's contribution) is
compared too, and must be a sizeable part of the vision tower's gradient, so a detached masked pass fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from multiprocess import run_distributed
from PIL import Image

TEMPERATURE = 0.7
GAMMA, ETA2 = 0.5, 0.2
# the spec's PAPO-G clip constants, written here independently of papo/config.py
EPS_LOW, EPS_HIGH, CLIP_DUAL, LOG_RATIO_CLAMP, KL_CLAMP = 0.2, 0.3, 3.0, 20.0, 10.0
IMAGE_SIZES = [(84, 56), (112, 112)]  # (width, height): grids [1, 4, 6] (one window) and [1, 8, 8] (four)
RESPONSE_LENGTHS = [5, 3, 6, 4]  # two responses per prompt: sequences [p0, p0, p1, p1]
ADVANTAGES = [1.0, -0.7, 0.8, -1.2]
MICRO_BATCHES = [[0, 2], [1, 3]]  # each micro-batch holds one sequence of each prompt (both image sizes)
MASK_STEP = 3
# float32 megatron-core vs float64 transformers, errors scaled by each tensor's largest |reference
# gradient|: measured <= 2.5e-6 at both layouts (float32 round-off through two vision and two LM layers
# and the vocabulary softmax; transformers' own float32 casts in RMSNorm, attention softmax and the vision
# RoPE are of the same order), so 1e-4 leaves a 40x margin. Without the masked branch the vision
# gradients are off by ~1 (see the last test): a real mistake is far outside it.
TOLERANCE = 1e-4
VISION = "model.visual."


def _perturb_and_save(hf_dir: str) -> None:
    """Weights large enough that the masked image moves the response log-probs (by ~1 nat), and every
    tensor (norms and biases too) non-trivial, so every gradient is tested."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() == 1 or name.startswith(VISION):
                p.copy_(0.05 * noise)
            else:
                p.copy_(0.06 * noise)
    model.save_pretrained(hf_dir)


def _inputs(hf_dir: str) -> dict:
    """Two encoded prompts with real images, their raw-grid masked pixel values, and the responses."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from megatron_papo.data.config import DataConfig, MaskingConfig
    from megatron_papo.data.encode import encode_prompt
    from megatron_papo.data.masking import ImageMasker
    from megatron_papo.data.records import PromptSample

    tokenizer, processor = AutoTokenizer.from_pretrained(hf_dir), AutoImageProcessor.from_pretrained(hf_dir)
    cfg = DataConfig(min_pixels=28 * 28, max_pixels=112 * 112, question_template="{question} Think.")
    masker = ImageMasker(MaskingConfig(strategy="raw_grid", ratio=0.6, seed=0), processor, 28 * 28, 112 * 112)
    rng = np.random.default_rng(0)
    prompts = []
    for i, (w, h) in enumerate(IMAGE_SIZES):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        sample = PromptSample(f"q{i}", f"{i:09d}", "s.tar", "How many circles?", "3", "math", "", [image], [])
        prompts.append(encode_prompt(sample, tokenizer, processor, cfg))
    g = torch.Generator().manual_seed(11)
    n = len(RESPONSE_LENGTHS) // len(prompts)
    seq_prompts = [p for p in prompts for _ in range(n)]
    return dict(
        prompt_ids=[p.input_ids for p in seq_prompts],
        pixel_values=[p.pixel_values for p in seq_prompts],
        masked_pixel_values=[masker(p, MASK_STEP) for p in prompts for _ in range(n)],
        image_grid_thw=[p.image_grid_thw for p in seq_prompts],
        responses=[torch.randint(20, len(tokenizer), (r,), generator=g) for r in RESPONSE_LENGTHS],
        advantages=torch.tensor(ADVANTAGES),
    )


def _spec_token_terms(lp, lp_mask, old, advantage: float) -> torch.Tensor:
    """Per response token: clipped surrogate (dual clip for A < 0) - gamma KL_prc + eta2 (-lp_mask)."""
    ratio = torch.exp((lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg = torch.maximum(-advantage * ratio, -advantage * ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH))
    if advantage < 0:
        pg = torch.minimum(pg, torch.full_like(pg, -advantage * CLIP_DUAL))
    d = lp_mask - lp
    kl_prc = (torch.exp(d) - d - 1).clamp(-KL_CLAMP, KL_CLAMP)
    return pg - GAMMA * kl_prc + ETA2 * (-lp_mask)


def _spec_loss(lps, lp_masks, olds) -> torch.Tensor:
    """Token-mean per micro-batch, averaged over the micro-batches (megatron-core's schedule)."""
    losses = []
    for members in MICRO_BATCHES:
        terms = [_spec_token_terms(lps[i], lp_masks[i], olds[i], ADVANTAGES[i]) for i in members]
        losses.append(torch.cat(terms).sum() / sum(RESPONSE_LENGTHS[i] for i in members))
    return torch.stack(losses).mean()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The tiny model, the inputs, the old log-probs, and transformers' float64 loss and gradients."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_papo.models.tiny import make_tiny_qwen25vl

    hf_dir = make_tiny_qwen25vl(str(tmp_path_factory.mktemp("masked_grad_vlm")))
    _perturb_and_save(hf_dir)
    data = _inputs(hf_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        hf_dir, dtype=torch.float64, attn_implementation="eager"
    ).eval()
    image_token = model.config.image_token_id

    def response_log_probs(i: int, pixels: torch.Tensor) -> torch.Tensor:
        prompt, response = data["prompt_ids"][i], data["responses"][i]
        ids = torch.cat([prompt, response])[None]
        logits = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels.double(),
            image_grid_thw=data["image_grid_thw"][i],
            mm_token_type_ids=(ids == image_token).long(),
        ).logits[0]
        scored = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]  # logits[t] scores token t + 1
        return torch.log_softmax(scored / TEMPERATURE, -1).gather(-1, response[:, None]).squeeze(-1)

    n = len(RESPONSE_LENGTHS)
    lps = [response_log_probs(i, data["pixel_values"][i]) for i in range(n)]
    lp_masks = [response_log_probs(i, data["masked_pixel_values"][i]) for i in range(n)]
    g = torch.Generator().manual_seed(13)
    olds = [lp.detach() + 0.3 * torch.randn(lp.shape, generator=g, dtype=torch.float64) for lp in lps]
    for lp, old in zip(lps, olds, strict=True):  # no ratio near a clip edge: float32 picks the same branch
        ratio = torch.exp(lp.detach() - old)
        assert ((ratio - (1 - EPS_LOW)).abs().min() > 1e-3) and ((ratio - (1 + EPS_HIGH)).abs().min() > 1e-3)
    params = {k: p for k, p in model.named_parameters()}  # tied: lm_head is the embedding, listed once
    loss_full = _spec_loss(lps, lp_masks, olds)
    loss_detached = _spec_loss(lps, [x.detach() for x in lp_masks], olds)
    grads = {}
    for kind, loss in (("full", loss_full), ("detached", loss_detached)):
        values = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
        grads[kind] = dict(zip(params, values, strict=True))
    d = torch.cat([(m - lp).detach() for m, lp in zip(lp_masks, lps, strict=True)])
    assert float((torch.exp(d) - d - 1).max()) < KL_CLAMP - 1  # KL_prc inside its clamp: it has a gradient
    return dict(
        hf_dir=hf_dir,
        data=data,
        old_log_probs=[o.float() for o in olds],
        loss=float(loss_full.detach()),
        grads=grads,
        lp=[lp.detach() for lp in lps],
        d=d,
    )


# ------------------------------------------------------------------ megatron-core side (spawned ranks)


def _relayout(tp: int) -> None:
    from megatron.core import parallel_state as ps

    from megatron_papo.parallel.initialize import set_seed

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
    set_seed(1234)


def _policy_gradients(hf_dir: str, data: dict, old_log_probs: list[torch.Tensor]) -> dict:
    """One layout: the masked_grad and the reference-default update on the same sequences; per config
    the per-micro-batch losses and (HF names) the gradients, exported through the weight mapping."""
    from megatron.core import parallel_state as ps

    from megatron_papo.config import TrainConfig
    from megatron_papo.models import ModelConfig, export_hf_state_dict
    from megatron_papo.papo.config import AlgorithmConfig
    from megatron_papo.policy import Policy
    from megatron_papo.training.passes import log_prob_pass
    from megatron_papo.training.schedule import run_schedule
    from megatron_papo.training.sequences import (
        TokenData,
        build_sequences,
        padded_length,
        response_token_values,
        update_micro_batch,
    )
    from megatron_papo.training.update_loss import UpdateLoss

    cfg = TrainConfig(model=ModelConfig(hf_path=hf_dir, attention="sdpa"))
    policy = Policy(cfg, total_optimizer_steps=1, with_engine=False)
    prompts, responses = data["prompt_ids"], data["responses"]
    seqs = build_sequences(
        prompts,
        responses,
        data["pixel_values"],
        data["masked_pixel_values"],
        data["image_grid_thw"],
        data["advantages"],
        pad_id=policy.pad_token_id,
        length=padded_length(prompts, responses),
        position_fn=policy.position_ids,
    )
    old = response_token_values(prompts, old_log_probs, seqs.length)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    tp_rank = ps.get_tensor_model_parallel_rank()
    mine = [torch.tensor(m) for m in MICRO_BATCHES][dp_rank::dp]  # DP=2: one micro-batch per rank

    # the trainer's forward-only pass with the masked images, over every sequence on every rank
    masked_lp = log_prob_pass(policy.model, seqs, len(seqs), TEMPERATURE, masked=True)
    out: dict = {}
    for kind, masked_grad in (("full", True), ("detached", False)):
        algo = AlgorithmConfig(
            name="papo_g", masked_grad=masked_grad, gamma=GAMMA, eta1=0.0, eta2=ETA2, ref_kl_coef=0.0
        )
        # token data as the trainer leaves it: masked log-probs only in the reference default
        seqs.token_data = TokenData(old_log_probs=old)
        if not masked_grad:
            seqs.token_data.masked_log_probs = masked_lp
        batches = [update_micro_batch(seqs, idx, with_masked=algo.masked_in_update) for idx in mine]
        for chunk in policy.model:
            chunk.zero_grad_buffer()
        update_loss = UpdateLoss(algo, TEMPERATURE, progress=0.0, num_microbatches=len(batches), dp_size=dp)

        def loss_fn(batch, logits, update_loss=update_loss):  # the loss as returned, before the schedule
            loss, metrics = update_loss(batch, logits)  # divides it in place by num_microbatches
            return loss, dict(metrics, returned_loss=loss.detach().clone())

        outputs = run_schedule(policy.model, batches, loss_fn, forward_only=False)
        out[kind] = dict(
            # once per DP rank (TP peers repeat them)
            doubled=[tuple(b.input_ids.shape) for b in batches] if tp_rank == 0 else [],
            losses=[float(o["returned_loss"]) for o in outputs] if tp_rank == 0 else [],
            actor_losses=[float(o["actor/loss"]) for o in outputs] if tp_rank == 0 else [],
            main_grads={n: p.main_grad.detach().clone() for n, p in policy.module.named_parameters()},
        )
    with torch.no_grad():  # the gradients through the same TP gather and HF layout as the weights
        for kind in out:
            for name, p in policy.module.named_parameters():
                p.copy_(out[kind]["main_grads"][name])
            grads = dict(export_hf_state_dict(policy.module))
            out[kind]["grads"] = grads if torch.distributed.get_rank() == 0 else None
            del out[kind]["main_grads"]
    return out


def _layouts(hf_dir: str, data: dict, old_log_probs: list[torch.Tensor]) -> dict:
    results = {"tp2": _policy_gradients(hf_dir, data, old_log_probs)}
    _relayout(1)  # TP=1 x DP=2
    results["tp1_dp2"] = _policy_gradients(hf_dir, data, old_log_probs)
    return results


@pytest.fixture(scope="module")
def policy_runs(reference) -> dict:
    ranks = run_distributed(
        _layouts, 2, reference["hf_dir"], reference["data"], reference["old_log_probs"], tp=2
    )
    runs = {}
    for layout in ranks[0]:
        runs[layout] = {}
        for kind in ranks[0][layout]:
            runs[layout][kind] = dict(
                grads=ranks[0][layout][kind]["grads"],
                losses=[x for r in ranks for x in r[layout][kind]["losses"]],
                actor_losses=[x for r in ranks for x in r[layout][kind]["actor_losses"]],
                doubled=[x for r in ranks for x in r[layout][kind]["doubled"]],
            )
    return runs


def _scaled_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    """max |ours - expected| over max |expected| (a tensor-wide scale: no division by tiny entries)."""
    return float((ours.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


def _norm(tensors) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def test_update_loss_matches_the_float64_spec_loss(reference, policy_runs):
    """The loss UpdateLoss returns for each micro-batch, averaged as the schedule does, is the spec's
    loss; with masked_grad the micro-batches really are doubled (original + masked images, one forward)."""
    for layout, runs in policy_runs.items():
        for kind, run in runs.items():
            loss = sum(run["losses"]) / len(run["losses"])
            assert abs(loss - reference["loss"]) <= 1e-5 * abs(reference["loss"]), (layout, kind, loss)
            rows = [shape[0] for shape in run["doubled"]]
            assert rows == ([4, 4] if kind == "full" else [2, 2]), (layout, kind, run["doubled"])


def test_gradients_match_float64_transformers(reference, policy_runs):
    """Every parameter's gradient (vision tower and LM), with masked_grad and in the reference default,
    equals transformers' float64 gradient of the spec loss (lp_mask differentiable / detached)."""
    for layout, runs in policy_runs.items():
        for kind, run in runs.items():
            expected, ours = reference["grads"][kind], run["grads"]
            assert set(expected) <= set(ours), sorted(set(expected) - set(ours))[:5]
            errors = {name: _scaled_error(ours[name], g) for name, g in expected.items()}
            worst = max(errors, key=errors.get)
            assert errors[worst] <= TOLERANCE, (layout, kind, worst, errors[worst])
            assert sum(name.startswith(VISION) for name in errors) >= 20


def test_masked_branch_gradient_reaches_the_vision_tower_and_matches(reference, policy_runs):
    """masked_grad minus the reference default is the masked pass's own gradient: for every vision
    tensor it equals transformers' float64 prediction and is a sizeable part of the tower's gradient."""
    full, detached = reference["grads"]["full"], reference["grads"]["detached"]
    vision = [name for name in full if name.startswith(VISION)]
    predicted = {name: full[name] - detached[name] for name in full}
    # not vacuous: the masked image moves the log-probs, and its branch carries real vision gradient
    assert float(reference["d"].abs().mean()) > 0.05
    assert _norm(predicted[n] for n in vision) > 0.2 * _norm(full[n] for n in vision)
    for layout, runs in policy_runs.items():
        ours = {n: runs["full"]["grads"][n].double() - runs["detached"]["grads"][n] for n in full}
        for name in vision:
            assert predicted[name].abs().max() > 0, name
            error = _scaled_error(ours[name], predicted[name])
            assert error <= TOLERANCE, (layout, name, error)
        for name in full:  # LM tensors too (their masked-branch share may be small: absolute scale)
            scale = max(float(full[name].abs().max()), 1e-30)
            assert float((ours[name] - predicted[name]).abs().max()) <= TOLERANCE * scale, (layout, name)


def test_a_detached_masked_pass_would_fail(reference, policy_runs):
    """The reference-default gradients (masked pass without gradient) miss the float64 masked_grad
    gradients of the vision tower by far more than the tolerance: the comparison above can fail."""
    full = reference["grads"]["full"]
    vision = [name for name in full if name.startswith(VISION)]
    for layout, runs in policy_runs.items():
        detached = runs["detached"]["grads"]
        worst = max(_scaled_error(detached[name], full[name]) for name in vision)
        assert worst > 50 * TOLERANCE, (layout, worst)


def test_actor_loss_metric_is_the_micro_batch_loss(policy_runs):
    """actor/loss as the schedule hands it back equals the loss UpdateLoss returned (TP=2 runs two
    micro-batches per rank, so the in-place division shows; TP=1 x DP=2 runs one)."""
    for layout, runs in policy_runs.items():
        for kind, run in runs.items():
            assert run["actor_losses"] == pytest.approx(run["losses"], rel=1e-6), (layout, kind)
