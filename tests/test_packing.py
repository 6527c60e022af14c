"""Packed sequences (``trainer.pack_sequences``) against padded ones, in one 4-process spawn.

Sequences: prompts with two images of different sizes, none (text only) and one larger image, responses
of different lengths, right-padded by ``build_sequences``; micro-batches of two, so the packed rows of a
schedule differ in length (the pipeline exchanges their shapes). At TP1 (x DP4), TP2, PP2 and TP2 x PP2:

- the logits of every real token through megatron-core's schedule, packed vs padded, within 1e-5;
- one whole training step (``token_data_pass`` then ``update_pass`` and the optimizer step, the trainer's
  passes on a fresh ``Policy``) packed vs padded for GRPO, PAPO-G, PAPO-D and PAPO-G with
  ``masked_grad``: the token data on response tokens, every metric, and every rank's reduced gradients.

At TP2 x PP2 also: token-budget micro-batches (``max_tokens``, other micro-batches than the fixed two)
give the same loss and gradients (global token-mean), and an on-policy step without the old log-prob
pass gives the same metrics and gradients as with it. Packing's layout and the token-budget bins are
checked on their own first. The tiny Qwen3-VL's logits and PAPO-G step agree packed vs padded at the same
layouts (at PP2 its DeepStack maps cross the stage boundary inside the packed rows).
"""

from __future__ import annotations

import numpy as np
import torch
from multiprocess import run_distributed
from PIL import Image

from megatron_papo.models.tiny import make_tiny_qwen3vl, make_tiny_qwen25vl

# (text before, image sizes (width, height), text after) per prompt: grids [1, 4, 6] and [1, 8, 4], none,
# [1, 8, 8]
PROMPTS = [
    ("how many circles are in", [(84, 56), (56, 112)], "the sum of digits shown is"),
    ("describe the largest red square then count", [], "so the answer is"),
    ("which shape is left of the star", [(112, 112)], "think"),
]
SEQUENCES = [(0, 9), (1, 3), (2, 6), (0, 2)]  # (prompt, response length); micro-batches of two
MICRO_BATCH, TEMPERATURE = 2, 0.7
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
ALGORITHMS = {
    "grpo": dict(name="grpo"),
    "papo_g": dict(name="papo_g"),
    "papo_d": dict(name="papo_d"),
    "papo_g_masked_grad": dict(name="papo_g", masked_grad=True),
}
BUDGET = 48  # tokens per micro-batch: the sequences (prompt + response) are ~15 to ~40 tokens long
TOLERANCE = 1e-5


def _inputs(hf_dir: str) -> dict:
    """Per sequence: prompt ids (image placeholders expanded), pixel values, masked pixel values (half
    the patches zeroed), grids, response ids; advantages."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(hf_dir)
    tokenizer, processor = AutoTokenizer.from_pretrained(hf_dir), AutoImageProcessor.from_pretrained(hf_dir)
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(3)
    prompts = []
    for before, sizes, after in PROMPTS:
        ids, pixels, grid = tokenizer(before, add_special_tokens=False).input_ids, None, None
        if sizes:
            images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
            encoded = processor(images=images, return_tensors="pt")
            pixels, grid = encoded["pixel_values"], encoded["image_grid_thw"]
            for tokens in (grid.prod(-1) // 4).tolist():
                ids += [
                    config.vision_start_token_id,
                    *[config.image_token_id] * tokens,
                    config.vision_end_token_id,
                ]
        ids += tokenizer(after, add_special_tokens=False).input_ids
        masked = None if pixels is None else pixels * (torch.rand(len(pixels), 1, generator=g) >= 0.5)
        prompts.append((torch.tensor(ids), pixels, masked, grid))
    columns = zip(*(prompts[p] for p, _ in SEQUENCES), strict=True)
    return dict(
        zip(
            ("prompts", "pixel_values", "masked_pixel_values", "image_grid_thw"),
            map(list, columns),
            strict=True,
        ),
        responses=[torch.randint(20, len(tokenizer) - 10, (n,), generator=g) for _, n in SEQUENCES],
        advantages=torch.tensor([1.0, -0.6, 0.8, -1.3]),
    )


def _sequences(policy, data: dict):
    """``build_sequences`` of ``_inputs``' sequences with the policy's positions."""
    from megatron_papo.training.sequences import build_sequences, padded_length

    length = padded_length(data["prompts"], data["responses"])
    return build_sequences(**data, pad_id=policy.pad_token_id, length=length, position_fn=policy.position_ids)


def _relayout(tp: int, pp: int) -> None:
    from megatron.core import parallel_state as ps

    from megatron_papo.parallel.initialize import set_seed

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    set_seed(1234)


def _logits(policy, seqs, packed: bool) -> torch.Tensor | None:
    """Logits [N, L, vocab] (gathered over TP; 0 on padding when packed) through the schedule; None off
    the last stage."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_papo.training.schedule import run_schedule
    from megatron_papo.training.sequences import micro_batch, micro_batch_indices

    def loss_fn(batch, output):
        full = tensor_parallel.gather_from_tensor_model_parallel_region(output)
        if batch.packing is not None:
            rows = batch.packing.copy(full, 0)
            b, length = batch.packing.shape
            full = rows.new_zeros(b * length, rows.shape[-1]).index_copy(0, batch.packing.index, rows)
            full = full.view(b, length, -1)
        return output.sum() * 0, {"logits": full}

    order = torch.arange(len(seqs))
    batches = [micro_batch(seqs, idx, packed=packed) for idx in micro_batch_indices(order, MICRO_BATCH)]
    outputs = run_schedule(policy.model, batches, loss_fn, forward_only=True)
    return torch.cat([o["logits"] for o in outputs]) if ps.is_pipeline_last_stage() else None


def _step(
    hf_dir: str, data: dict, algorithm: dict, packed: bool, max_tokens: int = 0, on_policy: bool = False
) -> dict:
    """One training step on a fresh policy: token data, metrics and this rank's reduced gradients; the
    micro-batches of its update."""
    from megatron.core import parallel_state as ps

    from megatron_papo.config import TrainConfig
    from megatron_papo.models import ModelConfig
    from megatron_papo.objectives.registry import build_objective
    from megatron_papo.papo.config import AlgorithmConfig
    from megatron_papo.policy import Policy
    from megatron_papo.training.passes import token_data_pass, update_pass
    from megatron_papo.training.sequences import micro_batches

    algo = AlgorithmConfig(**algorithm)
    cfg = TrainConfig(model=ModelConfig(hf_path=hf_dir, attention="sdpa"), algorithm=algo)
    objective = build_objective(algo)
    policy = Policy(cfg, 1, with_ref=objective.ref_log_probs_needed, with_engine=False)
    seqs = _sequences(policy, data)
    token_data_pass(
        policy.model,
        policy.ref_model,
        objective,
        seqs,
        MICRO_BATCH,
        TEMPERATURE,
        packed=packed,
        max_tokens=max_tokens,
        on_policy=on_policy,
    )
    (result,) = update_pass(
        policy.train_step,
        objective,
        seqs,
        sequences_per_update=len(seqs),
        micro_batch_size=MICRO_BATCH,
        ppo_epochs=1,
        temperature=TEMPERATURE,
        progress=0.3,
        generator=torch.Generator().manual_seed(0),
        packed=packed,
        max_tokens=max_tokens,
    )
    mask = seqs.loss_mask > 0
    token_data = {}
    if ps.is_pipeline_last_stage():
        data_ = seqs.token_data
        for name in ("old_log_probs", "masked_log_probs", "ref_log_probs"):
            value = getattr(data_, name)
            token_data[name] = None if value is None else value[mask]
    grads = {n: p.main_grad.detach().clone() for n, p in policy.module.named_parameters()}
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0))  # update_pass's
    rows = micro_batches(seqs, order, MICRO_BATCH, max_tokens, packed)
    return dict(metrics=result.metrics, token_data=token_data, grads=grads, rows=[r.tolist() for r in rows])


def _run(hf_dir: str, data: dict, layouts=tuple(LAYOUTS), algorithms=tuple(ALGORITHMS)) -> dict:
    from megatron_papo.config import TrainConfig
    from megatron_papo.models import ModelConfig
    from megatron_papo.policy import Policy

    out: dict = {"logits": {}, "steps": {}}
    for tp, pp in layouts:
        _relayout(tp, pp)
        policy = Policy(
            TrainConfig(model=ModelConfig(hf_path=hf_dir, attention="sdpa")), None, with_engine=False
        )
        seqs = _sequences(policy, data)
        padded, packed = _logits(policy, seqs, False), _logits(policy, seqs, True)
        if padded is not None:
            real = seqs.attention_mask > 0
            out["logits"][(tp, pp)] = float((padded[real] - packed[real]).abs().max())
        for name in algorithms:
            out["steps"][(tp, pp, name)] = {
                p: _step(hf_dir, data, ALGORITHMS[name], p) for p in (False, True)
            }
    exact = dict(name="papo_g", global_token_mean=True)
    out["budget"] = [_step(hf_dir, data, exact, True, max_tokens=m) for m in (0, BUDGET)]
    out["on_policy"] = [_step(hf_dir, data, ALGORITHMS["papo_g"], True, on_policy=o) for o in (False, True)]
    return out


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def _grad_diff(a: dict, b: dict) -> float:
    """The largest difference of two runs' gradients, each tensor's relative to its largest |gradient|
    (at least 1)."""
    return max(_max_diff(g, b["grads"][n]) / max(1.0, float(g.abs().max())) for n, g in a["grads"].items())


def test_packing_layout_and_token_budget_bins():
    from megatron_papo.training.packing import Packing
    from megatron_papo.training.sequences import token_budget_bins

    packing = Packing.of(torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), copies=2, multiple=4)
    assert packing.index.tolist() == [0, 1, 2, 4, 5] and (packing.pad, packing.row_length) == (2, 12)
    assert packing.cu_seqlens().tolist() == [0, 3, 5, 8, 10, 12]
    values = torch.arange(8).view(2, 4)
    assert packing.pack(values, fill=-1).tolist() == [[0, 1, 2, 4, 5, 0, 1, 2, 4, 5, -1, -1]]
    assert packing.scatter(packing.gather(values)).tolist() == [[0, 1, 2, 0], [4, 5, 0, 0]]
    assert packing.copy(packing.pack(values), 1).tolist() == [0, 1, 2, 4, 5]

    lengths = [30, 7, 12, 50, 9, 22, 18, 3]
    bins = token_budget_bins(lengths, 40)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert [3] in bins and all(sum(lengths[i] for i in b) <= 40 for b in bins if b != [3])
    assert bins == [[0], [1, 2, 4, 7], [3], [5, 6]]  # 101 tokens besides the long one: 3 bins of <= 40


def test_packed_sequences_equal_padded_at_every_layout(tmp_path):
    hf_dir = make_tiny_qwen25vl(str(tmp_path / "tiny"))
    results = run_distributed(_run, 4, hf_dir, _inputs(hf_dir))
    logits = {layout: d for r in results for layout, d in r["logits"].items()}
    assert sorted(logits) == sorted(LAYOUTS)
    assert all(d <= TOLERANCE for d in logits.values()), logits
    worst: dict[str, float] = {}
    for rank, r in enumerate(results):
        for key, runs in r["steps"].items():
            padded, packed = runs[False], runs[True]
            assert padded["metrics"].keys() == packed["metrics"].keys()
            for k, v in padded["metrics"].items():
                assert abs(v - packed["metrics"][k]) <= TOLERANCE * max(1.0, abs(v)), (key, rank, k)
            for k, v in padded["token_data"].items():
                assert (v is None) == (packed["token_data"][k] is None), (key, k)
                if v is not None:
                    assert _max_diff(v, packed["token_data"][k]) <= TOLERANCE, (key, rank, k)
            diff = _grad_diff(padded, packed)
            assert diff <= TOLERANCE, (key, rank, diff)
            assert any(float(g.abs().max()) > 0 for g in padded["grads"].values())
            worst[key[2]] = max(worst.get(key[2], 0.0), diff)
    budget = results[-1]["budget"]  # a last-stage rank of TP2 x PP2
    assert len(budget[1]["rows"]) != len(budget[0]["rows"]), budget[1]["rows"]
    assert abs(budget[0]["metrics"]["actor/loss"] - budget[1]["metrics"]["actor/loss"]) <= TOLERANCE
    on_policy = results[-1]["on_policy"]
    assert on_policy[1]["token_data"]["old_log_probs"] is None
    for k, v in on_policy[0]["metrics"].items():
        assert abs(v - on_policy[1]["metrics"][k]) <= TOLERANCE * max(1.0, abs(v)), k
    for r in results:
        assert _grad_diff(*r["budget"]) <= TOLERANCE and _grad_diff(*r["on_policy"]) <= TOLERANCE
    print(
        "max |logits| diff per layout", logits, "max |grad| diff per objective", worst,
        "budget", max(_grad_diff(*r["budget"]) for r in results),
        "on-policy", max(_grad_diff(*r["on_policy"]) for r in results),
    )  # fmt: skip


def test_qwen3vl_packed_sequences_equal_padded_at_every_layout(tmp_path):
    hf_dir = make_tiny_qwen3vl(str(tmp_path / "tiny"))
    results = run_distributed(_run, 4, hf_dir, _inputs(hf_dir), tuple(LAYOUTS), ("papo_g",))
    logits = {layout: d for r in results for layout, d in r["logits"].items()}
    grads = {key: _grad_diff(runs[False], runs[True]) for r in results for key, runs in r["steps"].items()}
    print("Qwen3-VL: max |logits| diff per layout", logits, "max |grad| diff", max(grads.values()))
    assert sorted(logits) == sorted(LAYOUTS)
    assert all(d <= TOLERANCE for d in logits.values()), logits
    assert all(d <= TOLERANCE for d in grads.values()), grads
