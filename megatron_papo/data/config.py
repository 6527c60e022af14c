"""The ``data`` section of the config: where prompts come from, how they are encoded and masked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_papo.config_io import check_choices

REFERENCE_QUESTION_TEMPLATE = (
    "{question} You FIRST think about the reasoning process as an internal monologue and then provide the "
    "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer "
    "MUST BE put in \\boxed{}."
)
QUESTION_TYPES = ("count", "color", "position", "digit_sum")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class SyntheticConfig:
    """The embedded vision-dependent task, generated when no ``train_data`` is given.

    ``difficulty`` 1: 1-3 large objects, 3 colors, 3 shapes; 2: up to 5 objects, 5 colors; 3: up to 6
    smaller objects, 6 colors, and digit-sum questions. Answer sets stay small (counts 0-5, colors,
    left/right, sums) so a tiny model can learn them.

    Prior trap (off by default): with ``count_prior_answer`` set, a ``count_prior_fraction`` share of the
    TRAIN split's count questions has that answer (the rest spread evenly over the other counts), while the
    test split stays uniform, or follows the same prior with ``count_prior_in_test`` (an i.i.d. test split);
    every sample is tagged ``extra["subset"]``: ``prior_consistent`` / ``prior_violating`` (a count
    question whose answer is / is not the prior) or ``other``. A policy that answers from the language
    prior scores well on train-like items and badly on the violating ones.
    """

    num_train: int = 2000
    num_test: int = 200
    seed: int = 0
    difficulty: int = 1
    image_size: int = 84
    question_types: tuple[str, ...] = ("count", "color", "position")
    samples_per_shard: int = 500
    count_prior_answer: int | None = None
    count_prior_fraction: float = 0.7
    count_prior_in_test: bool = False

    def __post_init__(self) -> None:
        _require(self.num_train >= 1, f"synthetic.num_train must be >= 1, got {self.num_train}")
        _require(self.num_test >= 0, f"synthetic.num_test must be >= 0, got {self.num_test}")
        _require(
            self.difficulty in (1, 2, 3), f"synthetic.difficulty must be 1, 2 or 3, got {self.difficulty}"
        )
        _require(
            56 <= self.image_size <= 448,
            f"synthetic.image_size must be in [56, 448] pixels, got {self.image_size}",
        )
        unknown = sorted(set(self.question_types) - set(QUESTION_TYPES))
        _require(
            bool(self.question_types) and not unknown,
            f"synthetic.question_types {list(self.question_types)}: unknown {unknown}; "
            f"choose from {list(QUESTION_TYPES)}",
        )
        _require(
            "digit_sum" not in self.question_types or self.difficulty == 3,
            "synthetic.question_types: 'digit_sum' needs synthetic.difficulty=3",
        )
        _require(self.samples_per_shard >= 1, "synthetic.samples_per_shard must be >= 1")
        _require(
            self.count_prior_answer is None or "count" in self.question_types,
            "synthetic.count_prior_answer needs 'count' in synthetic.question_types",
        )
        _require(
            self.count_prior_answer is not None or not self.count_prior_in_test,
            "synthetic.count_prior_in_test needs synthetic.count_prior_answer",
        )
        _require(
            0.0 <= self.count_prior_fraction <= 1.0,
            f"synthetic.count_prior_fraction must be in [0, 1], got {self.count_prior_fraction}",
        )


@dataclass
class DataConfig:
    """Prompt data: sources, order, image preprocessing and prompt formatting.

    ``train_data`` / ``test_data``: a ``manifest.json`` written by ``tools/make_shards.py`` (preferred: it
    holds the sample counts), or a brace/glob pattern of ``.tar`` shards (counted by a scan at start).
    ``None`` uses the synthetic task (``synthetic``), generated once into the run directory.
    ``question_template`` must contain ``{question}`` once; the reference recipe asks for reasoning in
    ``<think>...</think>`` then the final answer in ``\\boxed{}``. ``image_placeholder`` marks where images
    go in a prompt (ViRL39K's ``<image>``); prompts without it get their images first.
    ``max_image_pixels``: a stored image larger than this (by its header) is a bad sample, refused before
    it is decoded. ``skip_bad_samples``: bad samples are logged, counted (``data/skipped_samples``) and
    passed over instead of stopping the run; ``max_consecutive_bad_samples`` of them in a row (or a whole
    epoch of a rank's samples) stop it.
    """

    train_data: str | None = None
    test_data: str | None = None
    seed: int = 1234
    shuffle: bool = True
    shuffle_buffer: int = 512
    num_workers: int = 2
    prefetch_factor: int = 2
    min_pixels: int = 200704
    max_pixels: int = 1003520
    system_prompt: str | None = None
    question_template: str = REFERENCE_QUESTION_TEMPLATE
    image_placeholder: str = "<image>"
    max_prompt_length: int = 4096
    max_image_pixels: int = 1 << 26  # 8192 x 8192
    skip_bad_samples: bool = False
    max_consecutive_bad_samples: int = 100
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        for name in ("train_data", "test_data"):
            value = getattr(self, name)
            _require(value is None or value.strip() != "", f"data.{name} is an empty string (use null)")
        _require(self.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(self.prefetch_factor >= 1, f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        _require(
            28 * 28 <= self.min_pixels <= self.max_pixels,
            f"data.min_pixels ({self.min_pixels}) must be >= 784 (one 28x28 token) and <= data.max_pixels "
            f"({self.max_pixels})",
        )
        _require(
            self.question_template.count("{question}") == 1,
            "data.question_template must contain '{question}' exactly once, "
            f"got {self.question_template!r}",
        )
        _require(self.image_placeholder != "", "data.image_placeholder must not be empty")
        for name in ("max_image_pixels", "max_consecutive_bad_samples"):
            _require(getattr(self, name) >= 1, f"data.{name} must be >= 1, got {getattr(self, name)}")
        _require(
            self.max_prompt_length >= 1, f"data.max_prompt_length must be >= 1, got {self.max_prompt_length}"
        )


MaskingStrategy = Literal["raw_grid", "patch", "noise", "precomputed"]


@dataclass
class MaskingConfig:
    """How PAPO builds the masked image I_mask (one mask per prompt per step, shared by its rollouts).

    ``raw_grid`` (reference): on the raw image, ``square_size`` x ``square_size``-pixel squares, each
    blackened with probability ``ratio``, before resize/normalisation. ``patch``: each vision patch of the
    preprocessed pixels replaced by the processor's value for black with probability ``ratio``. ``noise``:
    Gaussian noise of std ``noise_std`` added to the preprocessed (normalised) pixels. ``precomputed``:
    masked images stored in the shard. Seeded by (``seed``, step, sample id): reruns give the same masks.
    """

    strategy: MaskingStrategy = "raw_grid"
    ratio: float = 0.6
    square_size: int = 14
    noise_std: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        check_choices(self, "masking")
        _require(0.0 <= self.ratio <= 1.0, f"masking.ratio must be in [0, 1], got {self.ratio}")
        _require(self.square_size >= 1, f"masking.square_size must be >= 1 pixel, got {self.square_size}")
        _require(self.noise_std > 0.0, f"masking.noise_std must be > 0, got {self.noise_std}")
