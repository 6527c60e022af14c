"""Qwen25VLModel on megatron-core vs transformers' own Qwen2.5-VL, in one 4-process spawn.

Layouts TP=2 x PP=2, TP=1, TP=2 (also with sequence parallelism) and PP=2 run through megatron-core's
pipeline schedule on a batch with two images of different sizes in one sample, a text-only sample and
one with a larger image, right-padded; logits of real tokens must match transformers' float32 forward
(eager attention) within 1e-4. At TP=2 x PP=2 the HF -> megatron -> HF round trip must be bitwise, for
tied and untied embeddings, with exactly the keys of transformers' ``state_dict()``. A randomly
initialised model saved with ``dist_checkpointing`` at TP=2 x PP=2 reloads at every other layout with
the same logits and the same exported weights. TP=4 (the model has 2 KV heads) is refused by name.
"""

import os
from functools import partial

import numpy as np
import pytest
import torch
from multiprocess import run_distributed
from PIL import Image

from megatron_papo.models.tiny import TinyQwen25VLSpec, make_tiny_qwen25vl

# (width, height) per sample: grids [1, 4, 6] and [1, 8, 4] (ragged windows), none, [1, 8, 8] (4 windows)
SAMPLES = [
    ("how many circles are in", [(84, 56), (56, 112)], "the sum of digits shown is"),
    ("describe the largest red square then count", [], "so the answer is"),
    ("which shape is left of the star", [(112, 112)], "think"),
]
LAYOUTS = [(1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False)]  # after TP=2 x PP=2
TOLERANCE = 1e-4


def make_batch(hf_dir: str) -> dict[str, torch.Tensor]:
    """Token ids with expanded image placeholders (as Qwen2_5_VLProcessor makes them), right-padded to
    an even length, with the image processor's pixel values and grids."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(hf_dir)
    tokenizer, processor = AutoTokenizer.from_pretrained(hf_dir), AutoImageProcessor.from_pretrained(hf_dir)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for _, sizes, _ in SAMPLES
        for w, h in sizes
    ]
    pixels = processor(images=images, return_tensors="pt")
    tokens_per_image = (pixels["image_grid_thw"].prod(-1) // 4).tolist()
    rows, image = [], 0
    for before, sizes, after in SAMPLES:
        row = tokenizer(before, add_special_tokens=False).input_ids
        for _ in sizes:
            row += [config.vision_start_token_id] + [config.image_token_id] * tokens_per_image[image]
            row += [config.vision_end_token_id]
            image += 1
        rows.append(row + tokenizer(after, add_special_tokens=False).input_ids)
    length = max(map(len, rows)) + 1
    length += length % 2  # sequence parallelism at TP=2
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixels["pixel_values"],
        image_grid_thw=pixels["image_grid_thw"],
    )


def transformers_reference(hf_dir: str, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits [b, s, vocab], state_dict) of transformers' own model."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits = model(
            **batch, mm_token_type_ids=(batch["input_ids"] == model.config.image_token_id).long()
        ).logits
    return logits, {k: v.clone() for k, v in model.state_dict().items()}


def _relayout(tp: int, pp: int) -> None:
    from megatron.core import parallel_state as ps

    from megatron_papo.parallel.initialize import set_seed

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    set_seed(1234)


def _loss(output: torch.Tensor):
    from megatron.core import tensor_parallel

    return output.sum() * 0, {"logits": tensor_parallel.gather_from_tensor_model_parallel_region(output)}


def _step(batch: dict, data_iterator, model):
    data = next(data_iterator)
    output = model(
        data["input_ids"],
        data["position_ids"],
        data["attention_mask"],
        data["pixel_values"],
        data["image_grid_thw"],
    )
    return output, _loss


def forward_logits(model, batch: dict) -> torch.Tensor | None:
    """Logits [b, s, vocab] (gathered over TP) through megatron-core's schedule; None off the last stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_papo.models import mrope_position_ids

    data = dict(batch)
    data["position_ids"] = mrope_position_ids(
        batch["input_ids"], batch["image_grid_thw"], batch["attention_mask"], model.hf_config
    )
    b, s = batch["input_ids"].shape
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=partial(_step, data),
            data_iterator=iter([data]),
            model=[model],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
        )
    return out[0]["logits"] if ps.is_pipeline_last_stage() else None


def _max_diff(logits: torch.Tensor | None, reference: torch.Tensor, mask: torch.Tensor) -> float | None:
    return None if logits is None else float((logits - reference)[mask.bool()].abs().max())


def _export(model) -> dict[str, torch.Tensor]:
    from megatron_papo.models import export_hf_state_dict

    return dict(export_hf_state_dict(model, buffer_bytes=16 << 10))  # small pieces: several per tensor


def _run(dirs: dict, batch: dict, references: dict, ckpt_dir: str) -> dict:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_papo.models import ModelConfig, build_model, load_hf_weights

    out: dict = {"diff": {}, "ckpt_diff": {}, "ckpt_export_equal": {}}
    mask = batch["attention_mask"]

    def build(kind: str, sequence_parallel: bool = False):
        return build_model(
            ModelConfig(hf_path=dirs[kind], attention="sdpa", sequence_parallel=sequence_parallel)
        )

    # TP=2 x PP=2: logits and bitwise round trip, tied and untied
    _relayout(2, 2)
    for kind in ("tied", "untied"):
        model = build(kind)
        load_hf_weights(model, dirs[kind])
        out["diff"][(2, 2, False, kind)] = _max_diff(forward_logits(model, batch), references[kind], mask)
        out[f"export_{kind}"] = _export(model)
    # a random model (not the HF weights) saved at TP=2 x PP=2
    random_model = build("untied")
    saved_logits = forward_logits(random_model, batch)
    saved_export = _export(random_model)
    dist_checkpointing.save(random_model.sharded_state_dict(), ckpt_dir)
    saved_logits = [saved_logits]
    dist.broadcast_object_list(saved_logits, src=dist.get_world_size() - 1)  # a last-stage rank

    for tp, pp, sp in LAYOUTS:
        _relayout(tp, pp)
        model = build("tied", sp)
        load_hf_weights(model, dirs["tied"])
        out["diff"][(tp, pp, sp, "tied")] = _max_diff(forward_logits(model, batch), references["tied"], mask)
        if sp:
            continue
        model = build("untied")
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
        out["ckpt_diff"][(tp, pp)] = _max_diff(forward_logits(model, batch), saved_logits[0], mask)
        exported = _export(model)
        out["ckpt_export_equal"][(tp, pp)] = exported.keys() == saved_export.keys() and all(
            torch.equal(exported[k], saved_export[k]) for k in exported
        )

    _relayout(4, 1)
    try:
        build("tied")
    except ValueError as e:
        out["tp4_error"] = str(e)
    return out


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("qwen25vl")
    return {
        "tied": make_tiny_qwen25vl(str(root / "tied")),
        "untied": make_tiny_qwen25vl(
            str(root / "untied"), TinyQwen25VLSpec(tie_word_embeddings=False, seed=1)
        ),
    }


def test_qwen25vl_matches_transformers_at_every_layout_and_round_trips(tiny_dirs, tmp_path):
    batch = make_batch(tiny_dirs["tied"])
    references, state_dicts = {}, {}
    for kind, hf_dir in tiny_dirs.items():
        references[kind], state_dicts[kind] = transformers_reference(hf_dir, batch)
    ckpt_dir = str(tmp_path / "ckpt")
    os.makedirs(ckpt_dir)
    results = run_distributed(_run, 4, tiny_dirs, batch, references, ckpt_dir, tp=1, pp=1)

    last_stage = {layout for r in results for layout, d in r["diff"].items() if d is not None}
    assert len(last_stage) == 2 + len(LAYOUTS)
    for r in results:
        for layout, diff in r["diff"].items():
            assert diff is None or diff <= TOLERANCE, (layout, diff)
        for layout, diff in r["ckpt_diff"].items():
            assert diff is None or diff <= 1e-5, (layout, diff)
        assert all(r["ckpt_export_equal"].values()), r["ckpt_export_equal"]
        for kind in ("tied", "untied"):
            exported, expected = r[f"export_{kind}"], state_dicts[kind]
            assert list(exported) != [] and set(exported) == set(expected)
            unequal = [k for k in expected if not torch.equal(exported[k], expected[k])]
            assert unequal == [], unequal
        assert "tensor_model_parallel_size 4 does not divide" in r["tp4_error"]
        assert "2 KV heads" in r["tp4_error"]
    # the random model really differs from the HF one (the checkpoint check is not vacuous)
    assert not torch.equal(
        results[0]["export_untied"]["lm_head.weight"], state_dicts["tied"]["lm_head.weight"]
    )
