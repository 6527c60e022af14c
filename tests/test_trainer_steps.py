"""Pieces of a real trainer's step, in process: which prompts get masked images, and SFT's loss.

Each case builds the real ``Trainer`` / ``SFTTrainer`` (policy, embedded rollout engine, synthetic data)
and calls its step methods; mask building is observed by wrapping ``PromptSource.mask_images`` with a
recorder that calls the real function.
"""

from __future__ import annotations

import os

from multiprocess import run_distributed

from megatron_papo.models.tiny import make_tiny_qwen25vl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")
PARITY_REWARD = (
    "def parity(response, answer, answer_type):\n"
    "    hit = float(sum(map(ord, response)) % 2)\n"
    "    return {'score': hit, 'accuracy': hit, 'format': 0.0}\n"
)


def _config(model: str, run_dir: str, *overrides: str):
    from megatron_papo.config import load_train_config

    return load_train_config(
        CONFIG,
        [
            f"model.hf_path={model}",
            f"trainer.output_dir={run_dir}",
            f"checkpoint.dir={run_dir}/ckpt",
            "parallel.tensor_model_parallel_size=1",
            "trainer.rollout_batch_size=2",
            "trainer.update_batch_size=2",
            "trainer.micro_batch_size=2",
            "rollout.n=2",
            "rollout.max_new_tokens=8",
            "logging.tensorboard=false",
            "eval.interval=0",
            *overrides,
        ],
    )


def _fresh_layout() -> None:
    """The trainer brings megatron-core's groups up itself."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


def _masks_built(model: str, root: str, reward: str) -> dict:
    from megatron_papo.rollout.distributed import RolloutGroups
    from megatron_papo.trainer import Trainer

    out = {}
    for name in ("grpo", "dapo", "papo_d"):
        _fresh_layout()
        cfg = _config(
            model, f"{root}/{name}", f"algorithm.name={name}", f"reward.function={reward}:parity",
            "algorithm.max_tries=8",
        )  # fmt: skip
        trainer = Trainer(cfg)
        built = []
        real = trainer.prompts.mask_images
        trainer.prompts.mask_images = lambda prompt, step, real=real, built=built: (
            built.append(prompt.uid) or real(prompt, step)
        )
        trainer.step = 1
        groups, metrics = trainer._sample_groups(1, RolloutGroups.trainers())
        out[name] = dict(
            built=built,
            used=[g.prompt.uid for g in groups],
            masked=[g.masked_pixel_values is not None for g in groups],
            metrics=metrics,
        )
    return out


def test_masked_images_are_built_only_for_kept_groups_of_objectives_that_use_them(tmp_path):
    model = make_tiny_qwen25vl(str(tmp_path / "tiny"))
    reward = tmp_path / "parity.py"
    reward.write_text(PARITY_REWARD)
    (result,) = run_distributed(_masks_built, 1, model, str(tmp_path / "runs"), str(reward))
    for name in ("grpo", "dapo"):  # objectives without a masked-image term build none
        assert result[name]["built"] == [] and not any(result[name]["masked"]), name
    papo_d = result["papo_d"]
    assert papo_d["built"] == papo_d["used"] and all(papo_d["masked"]) and len(papo_d["used"]) == 2
    # DAPO dropped groups on the way: none of them got a masked image
    metrics = papo_d["metrics"]
    assert metrics["rollout/keep_rate"] < 1 and metrics["rollout/tries"] >= 1


def _sft_losses(model: str, root: str) -> list[float]:
    from megatron_papo.sft import SFTTrainer

    losses = []
    for temperature in (1.0, 0.5):
        _fresh_layout()
        cfg = _config(model, f"{root}/t{temperature}", f"rollout.temperature={temperature}")
        trainer = SFTTrainer(cfg)
        trainer.step = 1
        losses.append(trainer.train_step().metrics["actor/loss"])
    return losses


def test_sft_loss_does_not_depend_on_the_rollout_temperature(tmp_path):
    model = make_tiny_qwen25vl(str(tmp_path / "tiny"))
    (losses,) = run_distributed(_sft_losses, 1, model, str(tmp_path / "runs"))
    assert losses[0] == losses[1] and losses[0] > 0, losses
