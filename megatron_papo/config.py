"""The whole configuration of a run: one typed tree, loaded from YAML plus ``key.sub=value`` overrides.

Each subsystem owns its section; this file composes them and checks what spans sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_papo.config_io import load_config
from megatron_papo.data.config import DataConfig, MaskingConfig
from megatron_papo.models.config import ModelConfig
from megatron_papo.papo.config import AlgorithmConfig
from megatron_papo.parallel import ParallelConfig
from megatron_papo.rewards.config import RewardConfig
from megatron_papo.rollout.config import RolloutConfig
from megatron_papo.training.checkpointing import CheckpointConfig
from megatron_papo.training.hacking import HackingDetectorConfig
from megatron_papo.training.optimizer import OptimizerConfig
from megatron_papo.training.trackers import MlflowConfig, WandbConfig


@dataclass
class TrainerConfig:
    """The ``trainer`` section: the loop's sizes. Batch sizes count prompts over all data-parallel ranks.

    Each step samples ``rollout_batch_size`` prompts x ``rollout.n`` responses, then takes
    ``ppo_epochs * rollout_batch_size / update_batch_size`` optimizer steps on them (reference: 384 / 128,
    3 optimizer steps), ``micro_batch_size`` sequences per forward/backward. ``pack_sequences`` (default on;
    exact, ``tests/test_packing.py``): a micro-batch's sequences are packed into one row without padding
    (``training.packing``; every pass).
    ``max_tokens_per_micro_batch`` > 0 (packed only): micro-batches of at most that many prompt + response
    tokens instead (a longer sequence alone; ``training.sequences.token_budget_bins``), few and balanced,
    after the DP ranks have evened out their tokens by exchanging whole groups (``training.dp_balance``).
    """

    output_dir: str = "runs/papo"
    seed: int = 1
    steps: int = 200
    rollout_batch_size: int = 384
    update_batch_size: int = 128
    micro_batch_size: int = 4
    ppo_epochs: int = 1
    pack_sequences: bool = True
    max_tokens_per_micro_batch: int = 0
    exit_after_steps: int = 0  # stop this invocation after N steps with a checkpoint (SLURM time limits)
    # stop after the step during which this many minutes passed, with a checkpoint and exit status 75
    # (as on SIGTERM / SIGUSR1); 0: no limit
    exit_after_minutes: float = 0.0
    max_bad_steps: int = 3  # consecutive steps with a NaN/inf loss or gradient (skipped) before a stop

    def __post_init__(self) -> None:
        if self.exit_after_steps < 0 or self.exit_after_minutes < 0:
            raise ValueError(
                f"trainer.exit_after_steps and exit_after_minutes must be >= 0, got {self.exit_after_steps} "
                f"and {self.exit_after_minutes}"
            )
        for name in (
            "steps",
            "rollout_batch_size",
            "update_batch_size",
            "micro_batch_size",
            "ppo_epochs",
            "max_bad_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_per_micro_batch < 0:
            raise ValueError(
                f"trainer.max_tokens_per_micro_batch must be >= 0, got {self.max_tokens_per_micro_batch}"
            )
        if self.max_tokens_per_micro_batch and not self.pack_sequences:
            raise ValueError("trainer.max_tokens_per_micro_batch needs trainer.pack_sequences=true")
        if self.rollout_batch_size % self.update_batch_size:
            raise ValueError(
                f"trainer.rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                f"trainer.update_batch_size ({self.update_batch_size})"
            )


@dataclass
class EvalConfig:
    """The ``eval`` section: accuracy on the test split with original and with masked images."""

    interval: int = 0  # steps between evaluations during training; 0: none
    max_prompts: int = 0  # 0: the whole test split
    n: int = 1  # samples per prompt (avg@n)
    at_start: bool = False  # evaluate before the first step too (a step-0 row): the before / after pair
    # sampling seed of the evaluation (and so of its responses); None: ``trainer.seed``. One value shared by
    # the evaluations of several runs makes them comparable (the same draws for every model)
    seed: int | None = None
    # each test prompt's accuracy with original and masked images, to ``trainer.output_dir``/eval_items/
    # step<N>.jsonl (paired comparisons of two policies on the same prompts)
    save_items: bool = False

    def __post_init__(self) -> None:
        if self.interval < 0 or self.max_prompts < 0 or self.n < 1:
            raise ValueError("eval: need interval >= 0, max_prompts >= 0 and n >= 1")


@dataclass
class LoggingConfig:
    """The ``logging`` section (metrics go to ``trainer.output_dir``; W&B and MLflow as well when on)."""

    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    hacking_detector: HackingDetectorConfig = field(default_factory=HackingDetectorConfig)
    # every trained sample (prompt, response, reward, the weight version that generated it) to
    # {trainer.output_dir}/rollouts/step<N>.jsonl, like verl's rollout_data_dir
    save_rollouts: bool = False


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.rollout.backend == "vllm" and self.eval.interval and self.masking.strategy == "noise":
            raise ValueError(
                "eval with rollout.backend=vllm sends masked images to the servers, and masking.strategy="
                "'noise' has none (its noise is on normalised pixels): use raw_grid, patch or precomputed, "
                "or eval.interval=0"
            )
        if self.trainer.pack_sequences and self.model.attention == "local":
            raise ValueError(
                "trainer.pack_sequences needs an attention backend that bounds packed sequences: "
                "model.attention auto, sdpa or te (megatron-core's local attention takes no packed sequences)"
            )
        if self.trainer.max_tokens_per_micro_batch and self.algorithm.vppo_tas_scope == "rank_micro_batch":
            raise ValueError(
                "algorithm.vppo_tas_scope=rank_micro_batch averages over fixed micro-batches: unset "
                "trainer.max_tokens_per_micro_batch or use vppo_tas_scope=batch"
            )
        if self.algorithm.overlong_buffer > self.rollout.max_new_tokens:
            raise ValueError(
                f"algorithm.overlong_buffer ({self.algorithm.overlong_buffer}) must be <= "
                f"rollout.max_new_tokens ({self.rollout.max_new_tokens})"
            )


def load_train_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The run's config from ``path`` (YAML) and ``key.sub=value`` overrides; errors name file and key."""
    return load_config(TrainConfig, path, overrides)
