"""Qwen3VLModel on megatron-core vs transformers' own Qwen3-VL, in one 4-process spawn.

The batch and the pipeline-schedule forward are test_model_qwen25vl's: two images of different sizes in
one sample, a text-only sample and one with a larger image, right-padded. Layouts TP=2 x PP=2, TP=1,
TP=2 (also with sequence parallelism) and PP=2 must give transformers' float32 eager logits on real
tokens within 1e-4 (every weight jittered, so no bias or norm is left at 0 or 1). The tiny model's two
DeepStack maps feed LM layers 0 and 1, so at PP=2 the second map crosses the stage boundary (the test
checks that it does, and that the vision tower's gradients through it, a fixed random probe of the
logits backpropagated through megatron-core's schedule, equal transformers'); a batch without images
runs at every layout too. At TP=2 x PP=2 the exported weights (streamed in 16 KiB pieces, several per
tensor) equal transformers' ``state_dict()`` bitwise, key for key.
"""

from functools import partial

import pytest
import torch
from multiprocess import run_distributed
from test_model_qwen25vl import TOLERANCE, _max_diff, _relayout, forward_logits, make_batch

from megatron_papo.models.tiny import make_tiny_qwen3vl

LAYOUTS = [(2, 2, False), (1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False)]  # (TP, PP, SP)
TEXT_ONLY = 1  # the sample of test_model_qwen25vl.SAMPLES without images


def jittered_tiny_qwen3vl(out_dir: str, **spec) -> str:
    """A tiny Qwen3-VL whose every tensor is distinct and nonzero: transformers initialises biases to 0 and
    norms to 1, which would hide a mapping that swaps two of them."""
    from transformers import Qwen3VLForConditionalGeneration

    from megatron_papo.models.tiny import TinyQwen3VLSpec

    make_tiny_qwen3vl(out_dir, TinyQwen3VLSpec(**spec))
    model = Qwen3VLForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    model.save_pretrained(out_dir)
    return out_dir


def transformers_logits(model, batch: dict) -> torch.Tensor:
    mm_token_type_ids = (batch["input_ids"] == model.config.image_token_id).long()
    return model(**batch, mm_token_type_ids=mm_token_type_ids).logits


def _probe_step(probe: torch.Tensor, data_iterator, model):
    data = next(data_iterator)
    args = ("input_ids", "position_ids", "attention_mask", "pixel_values", "image_grid_thw")
    return model(*(data[k] for k in args)), lambda logits: ((logits * probe).sum(), {})


def vision_gradients(model, batch: dict, probe: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """d(sum(logits * probe)) / d(vision weights) through megatron-core's schedule (TP=1), by HF name, on
    the first stage; None elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_papo.models import mrope_position_ids
    from megatron_papo.models.vision import export_hf_vision_weights

    data = dict(batch)
    data["position_ids"] = mrope_position_ids(
        batch["input_ids"], batch["image_grid_thw"], batch["attention_mask"], model.hf_config
    )
    b, s = batch["input_ids"].shape
    get_forward_backward_func()(
        forward_step_func=partial(_probe_step, probe),
        data_iterator=iter([data]),
        model=[model],
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=b,
        forward_only=False,
    )
    if model.vision is None:
        return None
    with torch.no_grad():
        for p in model.vision.parameters():
            p.copy_(p.grad)
    return dict(export_hf_vision_weights(model.vision, "model.visual."))


def _run(hf_dir: str, batches: dict, references: dict, probe: torch.Tensor) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_papo.models import ModelConfig, build_model, export_hf_state_dict, load_hf_weights

    out: dict = {"diff": {}}
    for tp, pp, sp in LAYOUTS:
        if (tp, pp) != (2, 2):  # the spawn starts at TP=2 x PP=2
            _relayout(tp, pp)
        model = build_model(ModelConfig(hf_path=hf_dir, attention="sdpa", sequence_parallel=sp))
        load_hf_weights(model, hf_dir)
        for name, batch in batches.items():
            logits = forward_logits(model, batch)
            out["diff"][(tp, pp, sp, name)] = _max_diff(logits, references[name], batch["attention_mask"])
        if (tp, pp) == (2, 2):
            out["export"] = dict(export_hf_state_dict(model, buffer_bytes=16 << 10))
        if (tp, pp) == (1, 2):
            out["deepstack_layers"] = [type(layer).__name__ for layer in model.language_model.decoder.layers]
            out["stage"] = ps.get_pipeline_model_parallel_rank()
            out["variable_shapes"] = model.config.variable_seq_lengths
            out["grads"] = vision_gradients(model, batches["images"], probe)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[list[dict], dict, dict]:
    """(each rank's results, transformers' state_dict, its vision gradients of the probe) for the tiny
    Qwen3-VL."""
    from transformers import Qwen3VLForConditionalGeneration

    hf_dir = jittered_tiny_qwen3vl(str(tmp_path_factory.mktemp("qwen3vl") / "tiny"))
    batch = make_batch(hf_dir)
    text_only = {k: batch[k][TEXT_ONLY : TEXT_ONLY + 1] for k in ("input_ids", "attention_mask")}
    batches = {"images": batch, "text": text_only | {"pixel_values": None, "image_grid_thw": None}}
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        references = {name: transformers_logits(model, b) for name, b in batches.items()}
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    probe = torch.randn(references["images"].shape, generator=torch.Generator().manual_seed(2))
    probe *= batch["attention_mask"][..., None]  # real tokens only
    (transformers_logits(model, batch) * probe).sum().backward()
    grads = {f"model.visual.{k}": p.grad for k, p in model.model.visual.named_parameters()}
    return run_distributed(_run, 4, hf_dir, batches, references, probe, tp=2, pp=2), state_dict, grads


@pytest.mark.parametrize("batch", ["images", "text"])
@pytest.mark.parametrize(
    "layout", LAYOUTS, ids=lambda layout: "tp{}_pp{}{}".format(*layout[:2], "_sp" * layout[2])
)
def test_logits_match_transformers(results, layout, batch):
    diffs = [r["diff"][(*layout, batch)] for r in results[0]]
    measured = [d for d in diffs if d is not None]  # last-stage ranks
    assert measured, diffs
    print(f"{layout} {batch}: max |logit diff| {max(measured):.2e}")
    assert max(measured) <= TOLERANCE


def test_deepstack_crosses_the_pipeline_boundary(results):
    ranks, _, expected = results
    by_stage = {r["stage"]: r["deepstack_layers"] for r in ranks}
    assert by_stage == {0: ["DeepStackLayer"], 1: ["DeepStackLayer"]}
    assert all(r["variable_shapes"] for r in ranks)
    # the second DeepStack merger feeds layer 1 on stage 1 only: its gradient crossed back over the boundary
    assert expected["model.visual.deepstack_merger_list.1.linear_fc2.weight"].abs().max() > 0
    scale = max(g.abs().max() for g in expected.values())
    for grads in (r["grads"] for r in ranks if r["stage"] == 0):
        assert grads.keys() == expected.keys()
        diffs = {k: float((grads[k] - g).abs().max()) for k, g in expected.items()}
        print(f"PP=2 vision gradients: max |diff| {max(diffs.values()):.2e} (max |g| {scale:.2e})")
        assert max(diffs.values()) <= 1e-4 * scale, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]


def test_export_is_transformers_state_dict_bitwise(results):
    ranks, state_dict, _ = results
    for r in ranks:
        assert list(r["export"]) != [] and set(r["export"]) == set(state_dict)
        assert [k for k in state_dict if not torch.equal(r["export"][k], state_dict[k])] == []
