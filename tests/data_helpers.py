"""Shared pieces of the data tests: real images, JSONL rows, shards via tools/make_shards.py, a tiny HF
tokenizer + Qwen2-VL image processor directory (no download)."""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
from PIL import Image

from megatron_papo.data.config import DataConfig
from megatron_papo.data.manifest import load_manifest
from megatron_papo.data.records import PromptSample, decode_sample, read_shard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import make_shards  # noqa: E402
import make_synthetic  # noqa: E402, F401

# tiny images keep preprocessing cheap: min/max pixels that bracket them, see ``data_config``
IMAGE_SIZES = [(30, 20), (45, 60), (70, 28), (33, 90)]


def random_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A noisy RGB image of (width, height) ``size``: every pixel matters to a comparison."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_rows(folder: str, count: int, multi_every: int = 5) -> str:
    """``folder/rows.jsonl`` with ``count`` rows whose images are PNG files in ``folder/images``.

    Row i has id ``q{i}``, answer ``str(i)``; every ``multi_every``-th row has two images.
    """
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, "rows.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            names = []
            for j in range(2 if i % multi_every == 0 else 1):
                name = f"images/{i}_{j}.png"
                random_image(IMAGE_SIZES[(i + j) % len(IMAGE_SIZES)], seed=100 * i + j).save(
                    os.path.join(folder, name)
                )
                names.append(name)
            row = {"id": f"q{i}", "prompt": f"Question {i}?", "answer": str(i), "images": names}
            f.write(json.dumps(row) + "\n")
    return path


def make_dataset(folder: str, count: int, samples_per_shard: int) -> str:
    """Rows -> shards through the real CLI; returns the manifest path."""
    rows = write_rows(folder, count)
    out = os.path.join(folder, "shards")
    return make_shards.main([rows, "--out", out, "--max-samples", str(samples_per_shard)])


def read_samples(manifest_path: str) -> list[PromptSample]:
    """Every sample of a data set, decoded, in manifest order."""
    return [
        decode_sample(raw)
        for shard in load_manifest(manifest_path).shards
        for raw in read_shard(shard.path, 0, shard.num_samples, shard.num_samples, skip_bad=False)
    ]


def tiny_processor_dir(folder: str) -> str:
    """An HF directory with the tiny Qwen2.5-VL tokenizer (chat template) and Qwen2-VL image processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from megatron_papo.models.tiny import build_tokenizer

    build_tokenizer(512).save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112).save_pretrained(folder)
    return folder


def data_config(**overrides) -> DataConfig:
    """Small pixel limits (1..16 tokens an image) and the given overrides."""
    return DataConfig(**{"min_pixels": 28 * 28, "max_pixels": 112 * 112, "num_workers": 0, **overrides})
