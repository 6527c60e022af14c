"""Accuracy on the test split with the original and with the masked images.

The gap between the two is the vision dependency PAPO is meant to grow: a policy that ignores the
image scores the same on both. Masks are those of step 0 (seeded), so evaluations are comparable; vLLM
servers are sent the masked images that preprocess to the embedded engine's masked pixel values
(``ImageMasker.images``; ``masking.strategy=noise`` has none and fails there).
"""

from __future__ import annotations

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


def evaluate(cfg: TrainConfig, policy: Policy, seed: int) -> dict[str, float]:
    """avg@``eval.n`` accuracy and format rate over the test split (or its first ``eval.max_prompts``)."""
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
    # accuracy, masked accuracy, format, masked format, responses
    totals = torch.zeros(5, dtype=torch.float64, device=current_device())
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
        for prompt, rollouts in zip(prompts, outputs, strict=True):
            texts = source.tokenizer.batch_decode(
                [r.response_ids for r in rollouts], skip_special_tokens=True
            )
            for text in texts:
                reward = source.reward_fn(text, prompt.answer, prompt.answer_type)
                totals[int(masked)] += reward.accuracy
                totals[2 + int(masked)] += reward.format
                totals[4] += 0.5  # counted once over the two passes
    dist.all_reduce(totals, group=ps.get_data_parallel_group())
    count = max(float(totals[4]), 1.0)
    accuracy, masked_accuracy = float(totals[0]) / count, float(totals[1]) / count
    return {
        "eval/accuracy": accuracy,
        "eval/masked_accuracy": masked_accuracy,
        "eval/accuracy_gap": accuracy - masked_accuracy,
        "eval/format": float(totals[2]) / count,
        "eval/masked_format": float(totals[3]) / count,
        "eval/prompts": count / cfg.eval.n,
    }
