"""Accuracy on the test split with the original and with the masked images.

The gap between the two is the vision dependency PAPO is meant to grow: a policy that ignores the
image scores the same on both. Masks are those of step 0 (seeded), so evaluations are comparable; vLLM
servers are sent the masked images that preprocess to the embedded engine's masked pixel values
(``ImageMasker.images``; ``masking.strategy=noise`` has none and fails there).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from PIL import Image

from megatron_papo.config import TrainConfig
from megatron_papo.data.encode import EncodedPrompt
from megatron_papo.parallel.device import current_device
from megatron_papo.policy import Policy
from megatron_papo.rollout.distributed import generate_in_model_parallel_group
from megatron_papo.rollout.engine import RolloutRequest
from megatron_papo.training.prompts import PromptSource
from megatron_papo.training.records import write_dp_records

EVAL_MASK_STEP = 0


def _request_images(
    source: PromptSource, prompt: EncodedPrompt, masked: bool, backend: str
) -> list[Image.Image] | None:
    """The RGB images of ``prompt``'s eval request: the originals, or in the masked pass those masked as the
    trainer masks them at ``EVAL_MASK_STEP`` for a backend that takes images (vLLM; the embedded engine
    takes the masked pixel values alone, and ``noise`` masking has no image)."""
    if not masked:
        return prompt.images
    return source.masked_rgb_images(prompt, EVAL_MASK_STEP) if backend == "vllm" else None


def evaluate(cfg: TrainConfig, policy: Policy, step: int) -> dict[str, float]:
    """avg@``eval.n`` accuracy and format rate over the test split (or its first ``eval.max_prompts``),
    overall and per subset tag of the prompts (``EvalTally.metrics``); sampled with ``eval.seed`` (else
    ``trainer.seed``). With ``eval.save_items`` each prompt's accuracies go to ``items_path(..., step)``."""
    seed = cfg.trainer.seed if cfg.eval.seed is None else cfg.eval.seed
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    source = PromptSource(
        cfg.model.hf_path,
        cfg.data,
        cfg.masking,
        cfg.reward,
        cfg.trainer.output_dir,
        dp_rank,
        dp_size,
        split="test",
        repeat=False,
    )
    limit = source.loader.samples_per_epoch
    if cfg.eval.max_prompts:
        limit = min(limit, -(-cfg.eval.max_prompts // dp_size))
    prompts = source.next_prompts(limit)
    tally = EvalTally()
    items: dict[str, dict] = {}  # uid -> its subset and avg@n accuracies (eval.save_items)
    for masked in (False, True):
        requests = [
            RolloutRequest(
                p.input_ids,
                source.mask_images(p, EVAL_MASK_STEP) if masked else p.pixel_values,
                p.image_grid_thw,
                seed=seed + i,
                prompt_text=p.prompt_text,
                images=_request_images(source, p, masked, cfg.rollout.backend),
            )
            for i, p in enumerate(prompts)
        ]
        outputs = generate_in_model_parallel_group(policy.engine, requests, cfg.eval.n)
        graded = [
            (prompt, text)
            for prompt, rollouts in zip(prompts, outputs, strict=True)
            for text in source.tokenizer.batch_decode(
                [r.response_ids for r in rollouts], skip_special_tokens=True
            )
        ]
        rewards = source.rewards.grade([(t, p.answer, p.answer_type) for p, t in graded])
        for (prompt, _), reward in zip(graded, rewards, strict=True):
            tally.add(prompt.extra.get("subset"), masked, reward.accuracy, reward.format)
            item = items.setdefault(prompt.uid, {"uid": prompt.uid, "subset": prompt.extra.get("subset")})
            key = "masked_accuracy" if masked else "accuracy"
            item[key] = item.get(key, 0.0) + reward.accuracy / cfg.eval.n
    source.close()
    if cfg.eval.save_items:
        write_dp_records(list(items.values()), items_path(cfg.trainer.output_dir, step))
    return tally.reduced(ps.get_data_parallel_group()).metrics(cfg.eval.n)


def items_path(output_dir: str, step: int) -> str:
    """Where ``eval.save_items`` puts the evaluation after ``step`` (0: before training)."""
    return os.path.join(output_dir, "eval_items", f"step{step}.jsonl")


class EvalTally:
    """Sums over scored responses, overall (key ``""``) and per subset tag (``extra["subset"]``).

    Each row holds [accuracy, masked accuracy, format, masked format, responses]; a response counts 0.5
    in each of the two passes (original, masked), so ``responses`` is the number per pass.
    """

    def __init__(self, sums: dict[str, list[float]] | None = None) -> None:
        self.sums = sums if sums is not None else {"": [0.0] * 5}

    def add(self, subset: str | None, masked: bool, accuracy: float, format_: float) -> None:
        for key in ("",) + ((subset,) if subset else ()):
            row = self.sums.setdefault(key, [0.0] * 5)
            row[int(masked)] += accuracy
            row[2 + int(masked)] += format_
            row[4] += 0.5

    def reduced(self, group: dist.ProcessGroup) -> EvalTally:
        """The sums over every rank of ``group`` (ranks may hold different tags)."""
        tags: list[list[str]] = [[] for _ in range(dist.get_world_size(group))]
        dist.all_gather_object(tags, sorted(self.sums), group=group)
        keys = sorted(set().union(*tags))
        rows = [self.sums.get(k, [0.0] * 5) for k in keys]
        totals = torch.tensor(rows, dtype=torch.float64, device=current_device())
        dist.all_reduce(totals, group=group)
        return EvalTally(dict(zip(keys, totals.tolist(), strict=True)))

    def metrics(self, n: int) -> dict[str, float]:
        """``eval/accuracy`` etc. over all prompts; per tag ``eval/accuracy/TAG``,
        ``eval/masked_accuracy/TAG`` and ``eval/prompts/TAG`` (``n``: samples per prompt)."""
        out = {}
        for key, (acc, masked_acc, fmt, masked_fmt, responses) in self.sums.items():
            count = max(responses, 1.0)
            suffix = f"/{key}" if key else ""
            out[f"eval/accuracy{suffix}"] = acc / count
            out[f"eval/masked_accuracy{suffix}"] = masked_acc / count
            out[f"eval/prompts{suffix}"] = responses / n
            if not key:
                out |= {
                    "eval/accuracy_gap": (acc - masked_acc) / count,
                    "eval/format": fmt / count,
                    "eval/masked_format": masked_fmt / count,
                }
        return out
