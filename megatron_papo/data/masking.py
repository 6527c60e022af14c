"""PAPO's masked image I_mask: one mask per prompt per step, shared by the prompt's rollouts.

The mask is drawn from a generator seeded by (``masking.seed``, step, sample id), so a rerun (or a
resumed run) masks bitwise the same. The masked ``pixel_values`` keep the original's shape and grid, so
the token layout of the prompt does not change.

Engines that take images rather than pixel values (vLLM servers) get ``ImageMasker.images``: RGB images the
image processor turns into exactly the masked ``pixel_values``. ``raw_grid`` and ``precomputed`` mask the raw
images, so those are sent; ``patch`` masks the resized image, recovered from the masked pixels (a resized
image is already at the processor's size, so it is not resized again); ``noise`` has no image (the noise is
on the normalised pixels, a different draw per temporal frame) and raises.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image

from megatron_papo.data.config import MaskingConfig
from megatron_papo.data.encode import EncodedPrompt, preprocess_images
from megatron_papo.data.records import BadSampleError


def mask_rng(seed: int, step: int, uid: str) -> np.random.Generator:
    """The generator for one prompt's mask at ``step`` (stable across processes and machines)."""
    uid_key = int.from_bytes(hashlib.sha256(uid.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([seed, step, uid_key]))


def mask_raw_grid(image: np.ndarray, ratio: float, square: int, rng: np.random.Generator) -> np.ndarray:
    """Black out ``square`` x ``square`` cells of ``image`` [H, W, 3] uint8, each with probability ``ratio``.

    The grid starts at the top-left corner; the last row / column of cells may be cut by the border.
    """
    height, width = image.shape[:2]
    cells = rng.random((-(-height // square), -(-width // square))) < ratio
    pixels = np.repeat(np.repeat(cells, square, axis=0), square, axis=1)[:height, :width]
    out = image.copy()
    out[pixels] = 0
    return out


def unpatchify(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, image_processor) -> list[np.ndarray]:
    """The resized images [H, W, 3] uint8 that ``image_processor`` made ``pixel_values`` [n_patches,
    C*T*P*P] of (grids ``image_grid_thw`` [n_images, 3]): the first temporal frame, un-normalised, rounded.

    Exact for pixel values the processor made from uint8 images: they are ``(u * rescale - mean) / std``.
    """
    p, m, t = image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size
    mean, std = np.asarray(image_processor.image_mean), np.asarray(image_processor.image_std)
    sizes, images = [int(g.prod()) for g in image_grid_thw], []
    for rows, (_, gh, gw) in zip(pixel_values.split(sizes), image_grid_thw.tolist(), strict=True):
        # rows: (gh/m, gw/m, m, m, C, T, P, P) -> (gh/m, m, P, gw/m, m, P, C) of frame 0
        patches = rows.double().numpy().reshape(gh // m, gw // m, m, m, 3, t, p, p)[:, :, :, :, :, 0]
        image = patches.transpose(0, 2, 5, 1, 3, 6, 4).reshape(gh * p, gw * p, 3)
        values = (image * std + mean) / image_processor.rescale_factor
        images.append(np.rint(values).clip(0, 255).astype(np.uint8))
    return images


class ImageMasker:
    """``masker(prompt, step) -> masked pixel_values [n_patches, C*T*P*P]`` for one ``EncodedPrompt``;
    ``masker.images(prompt, step)``: the same mask as RGB images (module docstring).

    ``image_processor``, ``min_pixels`` and ``max_pixels`` must be those the prompt was encoded with
    (``raw_grid`` and ``precomputed`` preprocess the masked images again).
    """

    def __init__(self, cfg: MaskingConfig, image_processor, min_pixels: int, max_pixels: int) -> None:
        self.cfg, self.image_processor = cfg, image_processor
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        side = image_processor.patch_size * image_processor.merge_size
        black = Image.new("RGB", (side, side))
        # the processor's own output for a black patch: what `patch` masking writes
        self.black_patch = self._preprocess([black])[0][0]

    def _preprocess(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        return preprocess_images(images, self.image_processor, self.min_pixels, self.max_pixels)

    def _masked_raw_images(self, prompt: EncodedPrompt, rng: np.random.Generator) -> list[Image.Image]:
        """``raw_grid`` / ``precomputed``: the masked images before preprocessing."""
        cfg = self.cfg
        if cfg.strategy == "raw_grid":
            return [
                Image.fromarray(mask_raw_grid(np.asarray(img), cfg.ratio, cfg.square_size, rng))
                for img in prompt.images
            ]
        if len(prompt.masked_images) != len(prompt.images):
            raise BadSampleError(
                prompt.shard,
                prompt.key,
                f"masking.strategy=precomputed but the sample stores {len(prompt.masked_images)} masked "
                f"images for {len(prompt.images)} images",
            )
        return prompt.masked_images

    def images(self, prompt: EncodedPrompt, step: int) -> list[Image.Image]:
        """The masked RGB images of ``prompt`` at ``step``: preprocessed, exactly ``self(prompt, step)``
        (module docstring); ValueError for ``noise``, which has no image."""
        cfg = self.cfg
        if cfg.strategy == "noise":
            raise ValueError(
                "masking.strategy=noise adds Gaussian noise to the normalised pixel values (a different draw "
                "per temporal frame): no image preprocesses to them, so an engine that takes images (rollout."
                "backend=vllm) cannot be sent the masked pass; use masking.strategy raw_grid, patch or "
                "precomputed, or rollout.backend=embedded"
            )
        if cfg.strategy == "patch":
            resized = unpatchify(self(prompt, step), prompt.image_grid_thw, self.image_processor)
            return [Image.fromarray(image) for image in resized]
        return self._masked_raw_images(prompt, mask_rng(cfg.seed, step, prompt.uid))

    def __call__(self, prompt: EncodedPrompt, step: int) -> torch.Tensor:
        cfg = self.cfg
        rng = mask_rng(cfg.seed, step, prompt.uid)
        if cfg.strategy in ("raw_grid", "precomputed"):
            pixels, grid = self._preprocess(self._masked_raw_images(prompt, rng))
        elif cfg.strategy == "patch":
            pixels, grid = prompt.pixel_values.clone(), prompt.image_grid_thw
            rows = torch.from_numpy(rng.random(len(pixels)) < cfg.ratio)
            pixels[rows] = self.black_patch
        else:  # noise
            noise = rng.standard_normal(tuple(prompt.pixel_values.shape), dtype=np.float32)
            pixels, grid = (
                prompt.pixel_values + cfg.noise_std * torch.from_numpy(noise),
                prompt.image_grid_thw,
            )
        if pixels.shape != prompt.pixel_values.shape or not torch.equal(grid, prompt.image_grid_thw):
            raise BadSampleError(
                prompt.shard,
                prompt.key,
                f"masked images preprocess to {tuple(pixels.shape)} / grid {grid.tolist()}, the originals to "
                f"{tuple(prompt.pixel_values.shape)} / {prompt.image_grid_thw.tolist()}",
            )
        return pixels
