"""The synthetic task: deterministic by seed, answers exact (re-derived from the pixels of each image, and
from the scene), train and test disjoint, the difficulty knob changes the task; tools/make_synthetic.py."""

import dataclasses
import hashlib
import os
import re

import numpy as np
import pytest
import torch
from data_helpers import data_config, make_synthetic, read_samples, tiny_processor_dir
from multiprocess import run_distributed

from megatron_papo.data.config import MaskingConfig, SyntheticConfig
from megatron_papo.data.manifest import load_manifest
from megatron_papo.data.records import DataError
from megatron_papo.data.synthetic import COLORS, DIGIT_FONT, LEVELS, generate
from megatron_papo.evaluate import EvalTally
from megatron_papo.rewards.config import RewardConfig
from megatron_papo.rewards.registry import papo_default
from megatron_papo.training.prompts import PromptSource

ARGS = ["--num-train", "80", "--num-test", "30", "--difficulty", "3", "--samples-per-shard", "32"]
ARGS += ["--question-types", "count", "color", "position", "digit_sum"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic") / "set")
    manifests = make_synthetic.main([out] + ARGS)
    return out, manifests, {split: read_samples(path) for split, path in manifests.items()}


def _scene_from_pixels(image: np.ndarray, grid: int) -> dict[tuple[int, int], tuple[str, str, int | None]]:
    """(row, col) -> (shape, color, digit) read off the image: one solid object per occupied cell.

    A shape fills a square box: all of it (square), ~pi/4 (circle) or ~1/2 (triangle); a digit is a 3x5
    glyph of ``scale``-pixel blocks, read block by block.
    """
    cell = image.shape[0] // grid
    colors = {rgb: name for name, rgb in COLORS.items()}
    glyphs = {rows: digit for digit, rows in DIGIT_FONT.items()}
    scene = {}
    for row in range(grid):
        for col in range(grid):
            patch = image[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
            ink = (patch != 255).any(axis=-1)
            if not ink.any():
                continue
            found = {tuple(int(v) for v in p) for p in patch[ink]}
            assert len(found) == 1, f"cell {row, col} holds several colors {found}"  # no anti-aliasing
            ys, xs = np.nonzero(ink)
            (y0, x0), height, width = (ys.min(), xs.min()), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            color = colors[found.pop()]
            if height != width:
                scale = height // 5
                bits = tuple(
                    "".join("#" if ink[y0 + r * scale, x0 + c * scale] else "." for c in range(3))
                    for r in range(5)
                )
                scene[row, col] = ("digit", color, glyphs[bits])
            else:
                fill = ink.sum() / (height * width)
                scene[row, col] = (
                    "square" if fill == 1 else "circle" if fill > 0.7 else "triangle",
                    color,
                    None,
                )
    return scene


def _answer_from_scene(question: str, scene: dict) -> str:
    objects = [(shape, color) for shape, color, _ in scene.values()]
    if m := re.fullmatch(r"How many (\w+) (\w+)s are there in the image\?", question):
        return str(objects.count((m[2], m[1])))
    if m := re.fullmatch(r"What color is the (\w+) in the image\?", question):
        (color,) = [c for s, c in objects if s == m[1]]
        return color
    if m := re.fullmatch(r"Is the (\w+) (\w+) to the left or to the right of the (\w+) (\w+)\?", question):
        (col_a,) = [c for (_, c), obj in scene.items() if obj[:2] == (m[2], m[1])]
        (col_b,) = [c for (_, c), obj in scene.items() if obj[:2] == (m[4], m[3])]
        return "left" if col_a < col_b else "right"
    assert question == "What is the sum of the digits shown in the image?"
    return str(sum(digit for _, _, digit in scene.values()))


def test_answers_are_exact_from_the_pixels(dataset):
    _, _, splits = dataset
    kinds = set()
    for sample in splits["train"] + splits["test"]:
        pixels = np.asarray(sample.images[0])
        assert pixels.shape == (84, 84, 3)
        scene = _scene_from_pixels(pixels, LEVELS[3].grid)
        assert _answer_from_scene(sample.prompt, scene) == sample.answer
        stored = {(o["row"], o["col"]): (o["shape"], o["color"], o["digit"]) for o in sample.extra["objects"]}
        assert stored == scene  # the scene kept with the sample is the one drawn
        assert (
            sample.vision_dependent is True and sample.source == f"synthetic/{sample.extra['question_type']}"
        )
        assert papo_default(sample.solution, sample.answer, sample.answer_type).score == 1.0
        kinds.add(sample.extra["question_type"])
    assert kinds == {"count", "color", "position", "digit_sum"}


def test_deterministic_by_seed_and_train_test_disjoint(dataset, tmp_path):
    out, manifests, splits = dataset
    assert {s: len(v) for s, v in splits.items()} == {"train": 80, "test": 30}
    again = make_synthetic.main([str(tmp_path / "again")] + ARGS)
    for split in ("train", "test"):
        pairs = zip(load_manifest(manifests[split]).shards, load_manifest(again[split]).shards, strict=True)
        for a, b in pairs:
            assert open(a.path, "rb").read() == open(b.path, "rb").read()
    other = make_synthetic.main([str(tmp_path / "other")] + ARGS + ["--seed", "1"])
    assert [s.prompt for s in read_samples(other["train"])] != [s.prompt for s in splits["train"]]

    train = {s.extra["fingerprint"] for s in splits["train"]}
    assert not train & {s.extra["fingerprint"] for s in splits["test"]}
    assert len({s.uid for s in splits["train"] + splits["test"]}) == 110

    # an existing set is reused only for the same arguments
    assert make_synthetic.main([out] + ARGS) == manifests
    with pytest.raises(SystemExit, match="exists but does not hold the synthetic set"):
        make_synthetic.main([out] + ARGS + ["--seed", "5"])
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]


def test_difficulty_changes_the_task():
    def stats(difficulty: int):
        cfg = SyntheticConfig(
            num_train=150, num_test=0, difficulty=difficulty, question_types=("count", "color")
        )
        samples = list(generate(cfg, "train"))
        objects = [s.extra["objects"] for s in samples]
        return (
            {o["color"] for objs in objects for o in objs},
            max(len(objs) for objs in objects),
            max(max(o["row"], o["col"]) for objs in objects for o in objs) + 1,
            {s.answer for s in samples if s.extra["question_type"] == "count"},
        )

    easy, hard = stats(1), stats(3)
    assert easy == ({"red", "green", "blue"}, 3, 3, {"0", "1", "2", "3"})
    assert hard == (set(COLORS), 6, 4, {"0", "1", "2", "3", "4", "5"})


def test_bad_settings_are_refused():
    with pytest.raises(SystemExit, match="'digit_sum' needs synthetic.difficulty=3"):
        make_synthetic.main(["unused", "--question-types", "digit_sum"])
    with pytest.raises(SystemExit, match="difficulty must be 1, 2 or 3"):
        make_synthetic.main(["unused", "--difficulty", "4"])
    with pytest.raises(SystemExit, match="unknown \\['shape'\\]"):
        make_synthetic.main(["unused", "--question-types", "shape"])


def test_the_trainer_prompt_source_serves_the_synthetic_task(tmp_path):
    hf = tiny_processor_dir(str(tmp_path / "hf"))
    data = data_config(synthetic=SyntheticConfig(num_train=12, num_test=4, image_size=56))
    source = PromptSource(
        hf, data, MaskingConfig(), RewardConfig(), str(tmp_path / "run"), dp_rank=1, dp_size=2
    )
    first = source.next_prompts(4)
    state = source.state_dict()
    rest = source.next_prompts(4)  # into the second epoch of this rank's 6
    resumed = PromptSource(
        hf, data, MaskingConfig(), RewardConfig(), str(tmp_path / "run"), dp_rank=1, dp_size=2
    )
    resumed.load_state_dict(state)
    assert [p.uid for p in resumed.next_prompts(4)] == [p.uid for p in rest]
    assert len({p.uid for p in first + rest[:2]}) == 6 and rest[2].epoch == 1
    for prompt in first:
        masked = source.mask_images(prompt, step=0)
        assert masked.shape == prompt.pixel_values.shape and not torch.equal(masked, prompt.pixel_values)
        assert (
            source.rewards.grade([(f"\\boxed{{{prompt.answer}}}", prompt.answer, prompt.answer_type)])[
                0
            ].accuracy
            == 1.0
        )
    test = PromptSource(
        hf, data, MaskingConfig(), RewardConfig(), str(tmp_path / "run"), 0, 1, "test", repeat=False
    )
    assert sorted(p.uid for p in test.next_prompts(10)) == [f"synthetic-test-{i:07d}" for i in range(4)]


PRIOR = SyntheticConfig(num_train=1200, num_test=400, count_prior_answer=2, count_prior_fraction=0.7)


def _count_answers(samples) -> list[str]:
    return [s.answer for s in samples if s.extra["question_type"] == "count"]


def test_prior_trap_skews_train_counts_only_and_tags_every_sample():
    train, test = list(generate(PRIOR, "train")), list(generate(PRIOR, "test"))
    # shares within 4 binomial standard errors of the configured ones (the set is fixed by its seed)
    expected = {"train": {"0": 0.1, "1": 0.1, "2": 0.7, "3": 0.1}, "test": dict.fromkeys("0123", 0.25)}
    for split, samples in (("train", train), ("test", test)):
        counts = _count_answers(samples)
        for answer, p in expected[split].items():
            assert abs(counts.count(answer) / len(counts) - p) < 4 * (p * (1 - p) / len(counts)) ** 0.5
    for sample in train + test:
        prior = "prior_consistent" if sample.answer == "2" else "prior_violating"
        assert sample.extra["subset"] == (prior if sample.extra["question_type"] == "count" else "other")
    # off by default: no tag, and the same scenes as before the option existed (fingerprints at HEAD~)
    plain = dataclasses.replace(PRIOR, count_prior_answer=None, num_train=50, num_test=20)
    for split, digest in (("train", "dfd77a298d0f3e55"), ("test", "42c4e0ed45a3dbfe")):
        samples = list(generate(plain, split))
        assert all("subset" not in s.extra for s in samples)
        keys = "".join(s.extra["fingerprint"] for s in samples)
        assert hashlib.sha256(keys.encode()).hexdigest()[:16] == digest
    with pytest.raises(DataError, match="count_prior_answer 4 is not a count of difficulty 1"):
        next(generate(dataclasses.replace(PRIOR, count_prior_answer=4), "train"))
    # an i.i.d. test split: the same skew as train, the same tags
    iid = _count_answers(generate(dataclasses.replace(PRIOR, count_prior_in_test=True), "test"))
    for answer, p in expected["train"].items():
        assert abs(iid.count(answer) / len(iid) - p) < 4 * (p * (1 - p) / len(iid)) ** 0.5
    with pytest.raises(ValueError, match="count_prior_in_test needs synthetic.count_prior_answer"):
        dataclasses.replace(plain, count_prior_in_test=True)


def test_eval_tally_per_subset_adds_up():
    tally = EvalTally()
    scored = [  # (subset, masked, accuracy, format)
        ("prior_violating", False, 1.0, 1.0),
        ("prior_violating", True, 0.0, 1.0),
        ("prior_consistent", False, 1.0, 1.0),
        ("prior_consistent", True, 1.0, 0.0),
        (None, False, 0.0, 1.0),
        (None, True, 0.0, 1.0),
    ]
    for subset, masked, accuracy, format_ in scored:
        tally.add(subset, masked, accuracy, format_)
    m = tally.metrics(n=1)
    assert m["eval/prompts"] == 3 and m["eval/accuracy"] == pytest.approx(2 / 3)
    assert m["eval/masked_accuracy"] == pytest.approx(1 / 3)
    assert m["eval/masked_format"] == pytest.approx(2 / 3)
    assert (m["eval/accuracy/prior_violating"], m["eval/masked_accuracy/prior_violating"]) == (1.0, 0.0)
    assert (m["eval/accuracy/prior_consistent"], m["eval/masked_accuracy/prior_consistent"]) == (1.0, 1.0)
    tags = ("prior_violating", "prior_consistent")
    assert sum(m[f"eval/prompts/{t}"] for t in tags) == 2
    assert "eval/accuracy/other" not in m


def _reduced_tally(rank_rows: list[list[tuple]]) -> dict[str, list[float]]:
    from megatron.core import parallel_state as ps

    tally = EvalTally()
    for row in rank_rows[ps.get_data_parallel_rank()]:
        tally.add(*row)
    return tally.reduced(ps.get_data_parallel_group()).sums


def test_eval_tally_reduces_over_ranks_with_different_tags():
    rows = [[("prior_violating", False, 1.0, 1.0)], [("other", False, 0.0, 1.0), (None, True, 1.0, 0.0)]]
    for sums in run_distributed(_reduced_tally, 2, rows):
        assert sums == {
            "": [1.0, 1.0, 2.0, 0.0, 1.5],
            "other": [0.0, 0.0, 1.0, 0.0, 0.5],
            "prior_violating": [1.0, 0.0, 1.0, 0.0, 0.5],
        }
