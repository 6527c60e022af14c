"""Raw tar samples -> validated ``PromptSample``; every error names the shard and the sample key."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from transformers.image_transforms import convert_to_rgb

from megatron_papo.data.config import DataConfig
from megatron_papo.data.shard_format import ANSWER_TYPES, JSON_SUFFIX, json_object


class DataError(ValueError):
    """Bad data: the message names the file (and the sample) and what is wrong."""


class BadSampleError(DataError):
    def __init__(self, shard: str, key: str, reason: str) -> None:
        super().__init__(f"shard {shard}, sample {key}: {reason}")
        self.shard, self.key, self.reason = shard, key, reason

    def __reduce__(self):  # keep (shard, key, reason) across DataLoader worker pickling
        return type(self), (self.shard, self.key, self.reason)


@dataclass
class RawSample:
    """One sample as stored: tar key, shard, its position in the shard, and member suffix -> bytes.

    ``error`` is set instead of ``members`` when the shard could not deliver this sample (skip mode).
    """

    shard: str
    key: str
    index_in_shard: int
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None


@dataclass
class PromptSample:
    """A decoded prompt: text fields and RGB images (``masked_images``: precomputed masks, may be empty)."""

    uid: str
    key: str
    shard: str
    prompt: str
    answer: str
    answer_type: str
    source: str
    images: list[Image.Image]
    masked_images: list[Image.Image]
    vision_dependent: bool | None = None
    solution: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_shard(path: str, start: int, stop: int, expected: int, skip_bad: bool) -> Iterator[RawSample]:
    """Samples ``start <= i < stop`` of the shard at ``path``, which should hold ``expected`` samples.

    A tar that ends early or breaks raises naming the shard and the last good key; with ``skip_bad`` the
    samples it could not deliver come back as ``RawSample`` with ``error`` set, so positions stay aligned.
    A shard holding more samples than expected always raises (the manifest is stale).
    """
    index, last_key, error = 0, None, None
    try:
        for sample in wds.tarfile_samples([{"url": path}]):
            if index >= stop:
                if stop == expected:
                    raise DataError(
                        f"shard {path} holds more than the {expected} samples its manifest lists (sample "
                        f"{sample['__key__']}); rebuild the manifest"
                    )
                return
            if index >= start:
                members = {k: v for k, v in sample.items() if not k.startswith("__")}
                yield RawSample(path, sample["__key__"], index, members)
            last_key = sample["__key__"]
            index += 1
    except DataError:
        raise
    except Exception as e:  # tarfile / gzip / OS errors of a broken shard
        error = f"the tar breaks after {index} samples (last good key {last_key!r}): {type(e).__name__}: {e}"
    if index >= stop:
        return
    error = error or f"the tar ends after {index} samples (last key {last_key!r}) but {expected} are listed"
    if not skip_bad:
        raise DataError(f"shard {path}: {error}")
    for i in range(max(index, start), stop):
        yield RawSample(path, f"#{i}", i, error=error)


def decode_sample(raw: RawSample, max_image_pixels: int = DataConfig.max_image_pixels) -> PromptSample:
    """Validate the JSON and decode the images of ``raw``; raises BadSampleError naming shard and key (an
    image whose header says it has more than ``max_image_pixels`` pixels is refused before decoding)."""

    def bad(reason: str) -> BadSampleError:
        return BadSampleError(raw.shard, raw.key, reason)

    if raw.error is not None:
        raise bad(raw.error)
    if JSON_SUFFIX not in raw.members:
        raise bad(f"no .{JSON_SUFFIX} member (members: {sorted(raw.members)})")
    try:
        meta = json_object(raw.members[JSON_SUFFIX])
    except ValueError as e:
        raise bad(f".json {e}") from e
    for name in ("id", "prompt", "answer", "answer_type", "num_images"):
        if name not in meta:
            raise bad(f".json lacks the field {name!r}")
    for name in ("id", "prompt", "answer"):
        if not isinstance(meta[name], str) or not meta[name].strip():
            raise bad(f"field {name!r} must be a non-empty string, got {meta[name]!r}")
    if meta["answer_type"] not in ANSWER_TYPES:
        raise bad(f"answer_type {meta['answer_type']!r} is not one of {ANSWER_TYPES}")
    num_images, num_masked = meta["num_images"], meta.get("num_masked_images", 0)
    if not isinstance(num_images, int) or num_images < 1:
        raise bad(f"num_images must be an integer >= 1, got {num_images!r}")
    images = [_decode_image(raw, f"img{i}", bad, max_image_pixels) for i in range(num_images)]
    masked = [_decode_image(raw, f"mask{i}", bad, max_image_pixels) for i in range(num_masked)]
    for i, m in enumerate(masked):
        if m.size != images[i].size:
            raise bad(f"masked image {i} is {m.size}, its image is {images[i].size}")
    return PromptSample(
        uid=meta["id"],
        key=raw.key,
        shard=raw.shard,
        prompt=meta["prompt"],
        answer=meta["answer"].strip(),
        answer_type=meta["answer_type"],
        source=meta.get("source") or "",
        images=images,
        masked_images=masked,
        vision_dependent=meta.get("vision_dependent"),
        solution=meta.get("solution"),
        extra=meta.get("extra") or {},
    )


def _decode_image(raw: RawSample, stem: str, bad, max_pixels: int) -> Image.Image:
    names = [k for k in raw.members if k.split(".", 1)[0] == stem]
    if len(names) != 1:
        raise bad(f"expected one image member {stem}.<ext>, found {names} (members: {sorted(raw.members)})")
    try:
        with Image.open(io.BytesIO(raw.members[names[0]])) as img:
            width, height = img.size  # from the header: nothing is decoded yet
            if width * height > max_pixels:
                raise bad(
                    f"{names[0]} is {width}x{height} = {width * height} pixels, more than "
                    f"data.max_image_pixels={max_pixels}"
                )
            img.load()
            # transformers' own RGB conversion (alpha composited on white), so the processor sees the same
            rgb = convert_to_rgb(img, return_numpy=True)
    except BadSampleError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise bad(f"{names[0]} is not a decodable image ({type(e).__name__}: {e})") from e
    return Image.fromarray(np.ascontiguousarray(rgb))
