"""Where a run's prompts come from: shards (or the synthetic task), masked images, and the reward."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from megatron_papo.data.config import DataConfig, MaskingConfig
from megatron_papo.data.encode import EncodedPrompt
from megatron_papo.data.masking import ImageMasker, unpatchify
from megatron_papo.data.reader import build_prompt_loader
from megatron_papo.data.synthetic import write_synthetic
from megatron_papo.rewards.config import RewardConfig
from megatron_papo.rewards.pool import RewardPool
from megatron_papo.training.trackers import InputImages


def resolve_split(cfg: DataConfig, split: str, run_dir: str) -> str:
    """The shard source of ``split`` ("train" | "test"); without one, the synthetic task written into
    ``run_dir/synthetic`` (by global rank 0, once; the other ranks wait)."""
    given = cfg.train_data if split == "train" else cfg.test_data
    if given is not None:
        return given
    out = os.path.join(run_dir, "synthetic")
    if not dist.is_initialized() or dist.get_rank() == 0:
        manifests = write_synthetic(cfg.synthetic, out)
    if dist.is_initialized():
        dist.barrier()
        manifests = write_synthetic(cfg.synthetic, out)  # reuses what rank 0 wrote
    if split not in manifests:
        raise ValueError(f"data: no {split} split (data.synthetic.num_test is 0 and data.test_data is unset)")
    return manifests[split]


class PromptSource:
    """Encoded prompts of one data-parallel rank, their masked images, and the reward (``rewards``: its
    worker pool; ``close`` stops it)."""

    def __init__(
        self,
        hf_path: str,
        data: DataConfig,
        masking: MaskingConfig,
        reward: RewardConfig,
        run_dir: str,
        dp_rank: int,
        dp_size: int,
        split: str = "train",
        repeat: bool = True,
    ) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(hf_path)
        self.image_processor = AutoImageProcessor.from_pretrained(hf_path)
        source = resolve_split(data, split, run_dir)
        self.loader = build_prompt_loader(
            source, data, self.tokenizer, self.image_processor, dp_rank, dp_size, repeat=repeat
        )
        self._iter = iter(self.loader)
        self.masker = ImageMasker(masking, self.image_processor, data.min_pixels, data.max_pixels)
        self.rewards = RewardPool(reward)

    def next_prompts(self, count: int) -> list[EncodedPrompt]:
        """The next ``count`` prompts (fewer only at the end of a non-repeating pass)."""
        out = []
        for prompt in self._iter:
            out.append(prompt)
            if len(out) == count:
                break
        return out

    def mask_images(self, prompt: EncodedPrompt, step: int) -> torch.Tensor | None:
        """The masked ``pixel_values`` of ``prompt`` for ``step`` (same grid; None for text-only prompts)."""
        if prompt.pixel_values is None or len(prompt.images) == 0:
            return None
        return self.masker(prompt, step)

    def masked_rgb_images(self, prompt: EncodedPrompt, step: int) -> list[Image.Image]:
        """The masked images of ``prompt`` for ``step`` as RGB images, for engines that take images (vLLM):
        preprocessed, exactly ``mask_images(prompt, step)``; ValueError for ``masking.strategy=noise``."""
        if prompt.pixel_values is None or len(prompt.images) == 0:
            return []
        return self.masker.images(prompt, step)

    def input_images(self, prompt: EncodedPrompt, step: int) -> InputImages | None:
        """``prompt``'s images as the policy sees them at ``step`` (resized, un-normalised), original and
        masked; None for a text-only prompt."""
        masked = self.mask_images(prompt, step)
        if masked is None:
            return None
        grid = prompt.image_grid_thw
        return InputImages(
            prompt.uid,
            original=unpatchify(prompt.pixel_values, grid, self.image_processor),
            masked=unpatchify(masked, grid, self.image_processor),
        )

    def close(self) -> None:
        self.rewards.close()

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._iter = iter(self.loader)
