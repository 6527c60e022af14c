"""The vision-dependent synthetic task: shapes on a grid, questions only the image can answer.

Each image is a white square split into a grid of cells; objects (circle / square / triangle in a few
solid colors) sit inside distinct cells, at least two pixels apart, drawn without anti-aliasing. The
questions: how many <color> <shape>s (0-5), what color is the <shape>, is A left or right of B, and (at
difficulty 3) the sum of the digits shown (a built-in 3x5 pixel font, so renders are identical on every
machine). Answers are drawn uniformly from their small sets before the scene is built around them, so
the question text alone does not give the answer away (unless the prior trap skews the train split's
counts: ``SyntheticConfig.count_prior_answer``). Each sample carries a reference ``solution``
(short reasoning in ``<think>...</think>`` then ``\\boxed{answer}``) for an SFT warm start.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from megatron_papo.data.config import SyntheticConfig
from megatron_papo.data.manifest import MANIFEST_NAME
from megatron_papo.data.records import DataError
from megatron_papo.data.shard_format import ShardSample
from megatron_papo.data.shard_writer import ShardWriter

COLORS = {
    "red": (230, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
DIGIT_FONT = {  # 3 wide x 5 high
    0: ("###", "#.#", "#.#", "#.#", "###"),
    1: (".#.", "##.", ".#.", ".#.", "###"),
    2: ("###", "..#", "###", "#..", "###"),
    3: ("###", "..#", "###", "..#", "###"),
    4: ("#.#", "#.#", "###", "..#", "..#"),
    5: ("###", "#..", "###", "..#", "###"),
    6: ("###", "#..", "###", "#.#", "###"),
    7: ("###", "..#", ".#.", ".#.", ".#."),
    8: ("###", "#.#", "###", "#.#", "###"),
    9: ("###", "#.#", "###", "..#", "###"),
}


@dataclass(frozen=True)
class Level:
    """What a difficulty level draws: palette size, grid side, objects per image, count range, size."""

    num_colors: int
    grid: int
    min_objects: int
    max_objects: int
    max_count: int
    size_fraction: float


LEVELS = {
    1: Level(num_colors=3, grid=3, min_objects=1, max_objects=3, max_count=3, size_fraction=0.8),
    2: Level(num_colors=5, grid=3, min_objects=2, max_objects=5, max_count=5, size_fraction=0.7),
    3: Level(num_colors=6, grid=4, min_objects=3, max_objects=6, max_count=5, size_fraction=0.65),
}


@dataclass(frozen=True)
class SceneObject:
    """A shape (or a digit, ``shape="digit"``) of one color in grid cell (row, col)."""

    shape: str
    color: str
    row: int
    col: int
    digit: int | None = None

    def name(self) -> str:
        return f"{self.color} digit {self.digit}" if self.shape == "digit" else f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str
    answer_type: str
    reasoning: str


def _pick(rng: np.random.Generator, items) -> object:
    return items[int(rng.integers(len(items)))]


def _place(
    rng: np.random.Generator, level: Level, specs: list[tuple[str, str]], cells=None
) -> list[SceneObject]:
    """Put (shape, color) specs into distinct random cells (or the given cells), in reading order."""
    if cells is None:
        flat = rng.choice(level.grid * level.grid, size=len(specs), replace=False)
        cells = [divmod(int(c), level.grid) for c in flat]
    objs = [SceneObject(s, c, r, k) for (s, c), (r, k) in zip(specs, cells, strict=True)]
    return sorted(objs, key=lambda o: (o.row, o.col))


def _other(rng: np.random.Generator, colors: list[str], avoid: set[tuple[str, str]]) -> tuple[str, str]:
    options = [(s, c) for s in SHAPES for c in colors if (s, c) not in avoid]
    return _pick(rng, options)


def _describe(objs: list[SceneObject]) -> str:
    names = [f"a {o.name()}" for o in objs]
    listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"I see {listing}."


@dataclass(frozen=True)
class CountPrior:
    """The train split's trap: a ``fraction`` share of count questions have the answer ``answer``."""

    answer: int
    fraction: float


def _count_value(rng: np.random.Generator, max_count: int, prior: CountPrior | None) -> int:
    """A count in 0..``max_count``: uniform, or ``prior.answer`` with probability ``prior.fraction`` and
    otherwise uniform over the other counts."""
    if prior is None:
        return int(rng.integers(max_count + 1))
    if rng.random() < prior.fraction:
        return prior.answer
    return _pick(rng, [k for k in range(max_count + 1) if k != prior.answer])


def _count_scene(
    rng: np.random.Generator, level: Level, colors: list[str], prior: CountPrior | None = None
) -> tuple[list[SceneObject], Question]:
    shape, color = _pick(rng, SHAPES), _pick(rng, colors)
    k = _count_value(rng, level.max_count, prior)
    n = int(rng.integers(max(k, level.min_objects), max(k, level.max_objects) + 1))
    specs = [(shape, color)] * k + [_other(rng, colors, {(shape, color)}) for _ in range(n - k)]
    objs = _place(rng, level, specs)
    found = {0: f"There are no {color} {shape}s.", 1: f"There is 1 {color} {shape}."}.get(
        k, f"There are {k} {color} {shape}s."
    )
    text = f"How many {color} {shape}s are there in the image?"
    return objs, Question("count", text, str(k), "math", f"{_describe(objs)} {found}")


def _color_scene(
    rng: np.random.Generator, level: Level, colors: list[str]
) -> tuple[list[SceneObject], Question]:
    shape, color = _pick(rng, SHAPES), _pick(rng, colors)
    n = int(rng.integers(level.min_objects, level.max_objects + 1))
    others = [s for s in SHAPES if s != shape]
    specs = [(shape, color)] + [(_pick(rng, others), _pick(rng, colors)) for _ in range(n - 1)]
    objs = _place(rng, level, specs)
    text = f"What color is the {shape} in the image?"
    return objs, Question("color", text, color, "exact", f"{_describe(objs)} The {shape} is {color}.")


def _position_scene(
    rng: np.random.Generator, level: Level, colors: list[str]
) -> tuple[list[SceneObject], Question]:
    first = (_pick(rng, SHAPES), _pick(rng, colors))
    second = _other(rng, colors, {first})
    col_a, col_b = (int(c) for c in rng.choice(level.grid, size=2, replace=False))
    row_a, row_b = (int(r) for r in rng.integers(level.grid, size=2))
    n = int(rng.integers(max(2, level.min_objects), level.max_objects + 1))
    free = [
        (r, c)
        for r in range(level.grid)
        for c in range(level.grid)
        if (r, c) not in {(row_a, col_a), (row_b, col_b)}
    ]
    extra = [free[int(i)] for i in rng.choice(len(free), size=n - 2, replace=False)]
    specs = [first, second] + [_other(rng, colors, {first, second}) for _ in range(n - 2)]
    objs = _place(rng, level, specs, [(row_a, col_a), (row_b, col_b)] + extra)
    a, b = f"{first[1]} {first[0]}", f"{second[1]} {second[0]}"
    side = "left" if col_a < col_b else "right"
    reasoning = (
        f"{_describe(objs)} The {a} is in column {col_a + 1} and the {b} in column {col_b + 1} "
        "from the left, "
        f"so the {a} is to the {side} of the {b}."
    )
    text = f"Is the {a} to the left or to the right of the {b}?"
    return objs, Question("position", text, side, "exact", reasoning)


def _digit_sum_scene(
    rng: np.random.Generator, level: Level, colors: list[str]
) -> tuple[list[SceneObject], Question]:
    n = int(rng.integers(2, 4))
    digits = [int(d) for d in rng.integers(10, size=n)]
    flat = rng.choice(level.grid * level.grid, size=n, replace=False)
    objs = sorted(
        (
            SceneObject("digit", _pick(rng, colors), *divmod(int(c), level.grid), digit=d)
            for c, d in zip(flat, digits, strict=True)
        ),
        key=lambda o: (o.row, o.col),
    )
    shown = [o.digit for o in objs]
    listing = ", ".join(map(str, shown[:-1])) + f" and {shown[-1]}"
    reasoning = f"The digits shown are {listing}. Their sum is {' + '.join(map(str, shown))} = {sum(shown)}."
    text = "What is the sum of the digits shown in the image?"
    return objs, Question("digit_sum", text, str(sum(shown)), "math", reasoning)


SceneBuilder = Callable[[np.random.Generator, Level, list[str]], tuple[list[SceneObject], Question]]
SCENES: dict[str, SceneBuilder] = {
    "count": _count_scene,
    "color": _color_scene,
    "position": _position_scene,
    "digit_sum": _digit_sum_scene,
}


def object_box(
    obj: SceneObject, image_size: int, level: Level, rng: np.random.Generator
) -> tuple[int, int, int]:
    """(x0, y0, side) of the object's square box: inside its cell, with a pixel of margin each side."""
    cell = image_size // level.grid
    side = max(5, min(int(cell * level.size_fraction), cell - 2))
    x0 = obj.col * cell + 1 + int(rng.integers(cell - side - 1))
    y0 = obj.row * cell + 1 + int(rng.integers(cell - side - 1))
    return x0, y0, side


def render(objs: list[SceneObject], image_size: int, level: Level, rng: np.random.Generator) -> Image.Image:
    """Draw the scene (solid fills, no anti-aliasing) on a white ``image_size`` square."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in objs:
        x0, y0, side = object_box(obj, image_size, level, rng)
        x1, y1, fill = x0 + side - 1, y0 + side - 1, COLORS[obj.color]
        if obj.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif obj.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(x0 + (side - 1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        else:
            scale = max(1, side // 5)
            for r, line in enumerate(DIGIT_FONT[obj.digit]):
                for c, bit in enumerate(line):
                    if bit == "#":
                        px, py = x0 + c * scale, y0 + r * scale
                        draw.rectangle([px, py, px + scale - 1, py + scale - 1], fill=fill)
    return img


def solution_text(question: Question) -> str:
    """The reference response: reasoning in <think>...</think>, then the boxed answer."""
    return f"<think> {question.reasoning} </think> \\boxed{{{question.answer}}}"


# the prior trap's subset tags (``extra["subset"]``): a count answered by the prior, a count that is not,
# any other question
SUBSET_TAGS = ("prior_consistent", "prior_violating", "other")


def subset_tag(prior_answer: int | None, question: Question) -> dict[str, str]:
    """``{"subset": tag}`` for the prior-trap variant (``prior_answer`` set), else ``{}``: a count question
    is ``prior_consistent`` when its answer is the prior, ``prior_violating`` when not; others ``other``."""
    if prior_answer is None:
        return {}
    if question.kind != "count":
        return {"subset": SUBSET_TAGS[2]}
    return {"subset": SUBSET_TAGS[0] if question.answer == str(prior_answer) else SUBSET_TAGS[1]}


def _scenes(cfg: SyntheticConfig, split: str, level: Level) -> dict[str, SceneBuilder]:
    """The scene builders of ``split``: the train split's count questions follow the prior trap if set, the
    test split's too with ``count_prior_in_test``."""
    if cfg.count_prior_answer is None or (split == "test" and not cfg.count_prior_in_test):
        return SCENES
    if not 0 <= cfg.count_prior_answer <= level.max_count:
        raise DataError(
            f"synthetic.count_prior_answer {cfg.count_prior_answer} is not a count of difficulty "
            f"{cfg.difficulty} (0..{level.max_count})"
        )
    prior = CountPrior(cfg.count_prior_answer, cfg.count_prior_fraction)
    return SCENES | {"count": functools.partial(_count_scene, prior=prior)}


def generate(cfg: SyntheticConfig, split: str, exclude: set[str] | None = None) -> Iterator[ShardSample]:
    """The ``split`` ("train" / "test") samples for ``cfg``, deterministic in ``cfg.seed``.

    Scenes whose fingerprint is in ``exclude`` are passed over (keeps test scenes out of train). With the
    prior trap on (``cfg.count_prior_answer``) the train split's count answers are skewed (the test split's
    too with ``cfg.count_prior_in_test``), and every sample's ``extra`` holds its ``subset`` tag.
    """
    num = {"train": cfg.num_train, "test": cfg.num_test}[split]
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, ("train", "test").index(split)]))
    level = LEVELS[cfg.difficulty]
    colors = list(COLORS)[: level.num_colors]
    scenes = _scenes(cfg, split, level)
    made = attempts = 0
    while made < num:
        attempts += 1
        if attempts > 100 * num:
            raise DataError(f"synthetic {split}: cannot find {num} scenes unseen in train; lower num_test")
        kind = _pick(rng, cfg.question_types)
        objs, question = scenes[kind](rng, level, colors)
        key = fingerprint(objs, question.text)
        if exclude is not None and key in exclude:
            continue
        image = render(objs, cfg.image_size, level, rng)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        yield ShardSample(
            uid=f"synthetic-{split}-{made:07d}",
            prompt=question.text,
            answer=question.answer,
            images=[buffer.getvalue()],
            answer_type=question.answer_type,
            source=f"synthetic/{kind}",
            vision_dependent=True,
            solution=solution_text(question),
            extra={
                "question_type": kind,
                "difficulty": cfg.difficulty,
                "fingerprint": key,
                "objects": [dataclasses.asdict(o) for o in objs],
            }
            | subset_tag(cfg.count_prior_answer, question),
        )
        made += 1


def fingerprint(objs: list[SceneObject], question: str) -> str:
    """Identifies a scene's content (objects by cell, the question) independent of pixel jitter."""
    return hashlib.sha256(
        json.dumps([question, [dataclasses.astuple(o) for o in objs]]).encode()
    ).hexdigest()[:16]


def write_synthetic(cfg: SyntheticConfig, out_dir: str) -> dict[str, str]:
    """Write ``out_dir/{train,test}/`` shards + manifests for ``cfg``; return {split: manifest path}.

    Reuses ``out_dir`` if it holds the same config; a different config there raises (nothing is deleted).
    The set is built in a temporary folder and renamed into place, so ``out_dir`` is complete or absent.
    """
    config_path = os.path.join(out_dir, "synthetic_config.json")
    wanted = dataclasses.asdict(cfg)
    # sets written before the prior-trap options existed stay reusable
    if cfg.count_prior_answer is None:
        del wanted["count_prior_answer"], wanted["count_prior_fraction"]
    if not cfg.count_prior_in_test:
        del wanted["count_prior_in_test"]
    wanted["question_types"] = list(wanted["question_types"])
    splits = ["train"] + (["test"] if cfg.num_test else [])
    manifests = {s: os.path.join(out_dir, s, MANIFEST_NAME) for s in splits}
    if os.path.exists(out_dir):
        try:
            with open(config_path, encoding="utf-8") as f:
                same = json.load(f) == wanted
        except (OSError, ValueError):
            same = False
        if not same:
            raise DataError(f"{out_dir} exists but does not hold the synthetic set for {wanted}; remove it")
        return manifests
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    seen: set[str] = set()
    for split in splits:
        writer = ShardWriter(
            os.path.join(tmp, split), prefix=split, max_bytes=1 << 40, max_samples=cfg.samples_per_shard
        )
        with writer:
            for sample in generate(cfg, split, exclude=seen if split == "test" else None):
                if split == "train":
                    seen.add(sample.extra["fingerprint"])
                writer.write(sample)
            writer.close()
    with open(os.path.join(tmp, "synthetic_config.json"), "w", encoding="utf-8") as f:
        json.dump(wanted, f, indent=1)
    os.replace(tmp, out_dir)
    return manifests
