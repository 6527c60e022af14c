"""The megatron-core vision tower against transformers' own Qwen2.5-VL visual tower (float32).

One spawn of 4 gloo processes runs the encoder at TP=4, then TP=2 (DP=2), then TP=1 (DP=4), on three
images of different sizes whose grids need several (partly padded) windows, through window blocks and a
full-attention block. At each TP size: output and parameter gradients equal transformers' (the HF
gradients of a fixed random probe of the output), HF -> shards -> HF is bitwise, and the megatron-core
distributed checkpoint saved at the previous TP size loads bitwise. Bad input gives clear errors.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from multiprocess import run_distributed
from PIL import Image

PREFIX = "model.visual."  # transformers 5's Qwen2_5_VLForConditionalGeneration.state_dict() names
IMAGE_SIZES = [(168, 112), (56, 56), (140, 84)]  # (width, height): 2x3 windows, 1 window, 2x3 ragged
TP_SIZES = (4, 2, 1)


def _vision_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random Qwen2.5-VL, real processor inputs, and transformers' output and gradients."""
    from transformers import AutoImageProcessor, Qwen2_5_VLForConditionalGeneration

    from megatron_papo.models.tiny import TinyQwen25VLSpec, make_tiny_qwen25vl

    spec = TinyQwen25VLSpec(
        vision_depth=3,
        vision_hidden_size=128,
        vision_intermediate_size=256,
        vision_heads=4,
        fullatt_block_indexes=(1,),
        max_pixels=200 * 200,
    )
    path = make_tiny_qwen25vl(str(tmp_path_factory.mktemp("tiny")), spec)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in IMAGE_SIZES]
    inputs = AutoImageProcessor.from_pretrained(path)(images=images, return_tensors="pt")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32)
    visual = model.model.visual
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1: make every tensor matter
        for p in visual.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    output = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    probe = torch.randn(output.shape, generator=generator)
    (output * probe).sum().backward()
    grads = {PREFIX + k: p.grad.clone() for k, p in visual.named_parameters()}
    return dict(
        config=model.config.vision_config,
        lm_hidden=model.config.get_text_config().hidden_size,
        weights=_vision_state(model),
        pixel_values=inputs["pixel_values"],
        grid_thw=inputs["image_grid_thw"],
        output=output.detach(),
        probe=probe,
        grads=grads,
    )


def _use_tp(tp: int) -> None:
    from megatron.core import parallel_state as ps

    from megatron_papo.parallel.initialize import set_seed

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=True)
    set_seed(1234)


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, KeyError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _phases(ref: dict, ckpt_root: str) -> dict:
    """Every check at TP = 4, 2, 1 on this rank; returns what the parent asserts on."""
    import copy

    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_papo.models.vision import (
        build_vision_encoder,
        export_hf_vision_weights,
        load_hf_vision_weights,
    )

    def build():
        return build_vision_encoder(ref["config"], ref["lm_hidden"], params_dtype=torch.float32)

    results: dict = {}
    for i, tp in enumerate(TP_SIZES):
        if i:
            _use_tp(tp)
        assert ps.get_tensor_model_parallel_world_size() == tp
        out: dict = {}
        if i:  # the checkpoint written at the previous TP size, into random weights
            restored = build()
            previous = os.path.join(ckpt_root, f"tp{TP_SIZES[i - 1]}")
            restored.load_state_dict(dist_checkpointing.load(restored.sharded_state_dict(), previous))
            out["restored"] = dict(export_hf_vision_weights(restored, PREFIX))
        encoder = build()
        load_hf_vision_weights(encoder, ref["weights"], PREFIX)
        out["exported"] = dict(export_hf_vision_weights(encoder, PREFIX))
        dist_checkpointing.save(encoder.sharded_state_dict(), os.path.join(ckpt_root, f"tp{tp}"))
        output = encoder(ref["pixel_values"], ref["grid_thw"])
        (output * ref["probe"]).sum().backward()
        out["output"] = output.detach()
        with torch.no_grad():  # the gradients, through the same TP gather and HF layout as the weights
            for p in encoder.parameters():
                p.copy_(p.grad)
        out["grads"] = dict(export_hf_vision_weights(encoder, PREFIX))
        results[tp] = out

    _use_tp(2)
    encoder = build()
    three_heads = copy.deepcopy(ref["config"])
    three_heads.num_heads = 3
    pixels, grid = ref["pixel_values"], ref["grid_thw"]
    missing = {k: v for k, v in ref["weights"].items() if not k.endswith("blocks.1.attn.qkv.bias")}
    bad_shape = dict(ref["weights"], **{PREFIX + "merger.mlp.0.weight": torch.zeros(3, 3)})
    results["errors"] = dict(
        grid=_error(lambda: encoder(pixels[:-4], grid)),
        width=_error(lambda: encoder(pixels[:, :-1], grid)),
        odd_grid=_error(lambda: encoder(pixels[:96], torch.tensor([[1, 96, 1]]))),
        missing=_error(lambda: load_hf_vision_weights(encoder, missing, PREFIX)),
        shape=_error(lambda: load_hf_vision_weights(encoder, bad_shape, PREFIX)),
        lm_hidden=_error(lambda: build_vision_encoder(ref["config"], 7, params_dtype=torch.float32)),
        heads=_error(lambda: build_vision_encoder(three_heads, ref["lm_hidden"], params_dtype=torch.float32)),
    )
    return results


def test_vision_tower_matches_transformers_at_tp_4_2_1(reference, tmp_path):
    for tp in TP_SIZES:  # dist_checkpointing writes into existing, empty directories
        (tmp_path / f"tp{tp}").mkdir()
    ranks = run_distributed(_phases, 4, reference, str(tmp_path), tp=TP_SIZES[0])
    weights, grads = reference["weights"], reference["grads"]
    scale = max(g.abs().max() for g in grads.values())
    for rank, result in enumerate(ranks):
        for i, tp in enumerate(TP_SIZES):
            got, where = result[tp], f"rank {rank}, TP={tp}"
            assert got["output"].shape == reference["output"].shape
            diff = (got["output"] - reference["output"]).abs().max().item()
            assert diff <= 1e-4, f"{where}: output differs from transformers by {diff}"
            for name, kind in (("exported", "weights"), ("restored", "checkpoint")):
                if name not in got:
                    continue
                assert got[name].keys() == weights.keys(), where
                unequal = [k for k in weights if not torch.equal(got[name][k], weights[k])]
                assert not unequal, f"{where}: {kind} round trip not bitwise for {unequal}"
            assert got["grads"].keys() == grads.keys()
            for k in grads:
                diff = (got["grads"][k] - grads[k]).abs().max().item()
                assert diff <= 1e-4 * scale, f"{where}: gradient of {k} differs by {diff} (max |g| {scale})"
            if i == 0:
                assert "restored" not in got
    assert reference["output"].abs().max() > 0.1  # the comparison is not between near-zero tensors
    errors = ranks[0]["errors"]
    assert "describe 172 patches, pixel_values has 168" in errors["grid"]
    assert "pixel_values must be [patches, 1176]" in errors["width"]
    assert "multiples of the spatial merge size 2" in errors["odd_grid"]
    assert errors["missing"].startswith("KeyError") and "blocks.1.attn.qkv.bias" in errors["missing"]
    assert "merger.mlp.0.weight" in errors["shape"] and "merger.fc1.weight" in errors["shape"]
    assert "out_hidden_size 128 differs from the LM hidden size 7" in errors["lm_hidden"]
    assert "tensor_model_parallel_size 2 does not divide the 3 vision attention heads" in errors["heads"]


def test_segment_attention_equals_block_diagonal_softmax():
    """Grouped segment attention == float64 softmax(QK^T / sqrt(d) + block-diagonal mask) V."""
    from megatron_papo.models.vision.segments import Segments

    cu = torch.tensor([0, 16, 20, 36, 44, 45, 61, 69])  # lengths 16, 4, 16, 8, 1, 16, 8
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(69, 3, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    segments = Segments.from_cu_seqlens(cu, torch.device("cpu"))
    assert segments.groups == ((1, 1), (1, 4), (2, 8), (3, 16))
    segment = torch.repeat_interleave(torch.arange(7), cu[1:] - cu[:-1])
    scores = torch.einsum("qhd,khd->hqk", q, k) / 8**0.5
    scores = scores.masked_fill(segment[:, None] != segment[None, :], float("-inf"))
    expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    torch.testing.assert_close(segments.attend(q, k, v, None), expected, rtol=1e-12, atol=1e-12)
