"""The layout of one prompt sample inside a webdataset ``.tar`` shard.

A sample with key ``K`` (digits only, no dots) is the consecutive tar members::

    K.json        {"id", "prompt", "answer", "answer_type", "source", "vision_dependent",
                   "num_images", "num_masked_images", "solution", "extra"}   (UTF-8)
    K.img0.png    first image, in its original encoding (png / jpg / webp / ...)
    K.img1.jpg    ...
    K.mask0.png   optional precomputed masked image for img0 (``masking.strategy=precomputed``)
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

ANSWER_TYPES = ("math", "choice", "exact")
JSON_SUFFIX = "json"
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def image_suffix(index: int, ext: str) -> str:
    return f"img{index}.{ext}"


def masked_suffix(index: int, ext: str) -> str:
    return f"mask{index}.{ext}"


def sample_key(index: int) -> str:
    """The tar key of the ``index``-th sample written to a data set."""
    return f"{index:09d}"


def json_object(data: bytes) -> dict[str, Any]:
    """``data`` decoded as a UTF-8 JSON object; ``ValueError`` saying what is wrong otherwise."""
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 ({e})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"must hold a JSON object, got {type(value).__name__}")
    return value


def inspect_image(data: bytes) -> tuple[str, tuple[int, int]]:
    """(file extension, (width, height)) of encoded image ``data``; ValueError if PIL cannot decode it."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, size = img.format, img.size
            img.load()
    except Exception as e:  # PIL raises many types for bad data
        raise ValueError(f"not a decodable image ({type(e).__name__}: {e})") from e
    if fmt not in _EXTENSIONS:
        raise ValueError(f"unsupported image format {fmt!r}; supported: {sorted(_EXTENSIONS)}")
    return _EXTENSIONS[fmt], size


@dataclass
class ShardSample:
    """One prompt to store: text fields plus encoded images (bytes, as read from the source)."""

    uid: str
    prompt: str
    answer: str
    images: list[bytes]
    answer_type: str = "math"
    source: str = ""
    vision_dependent: bool | None = None
    solution: str | None = None
    masked_images: list[bytes] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError naming the first problem (bad field, undecodable image, mask mismatch)."""
        for name in ("uid", "prompt", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"field {name!r} must be a non-empty string, got {value!r}")
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"answer_type {self.answer_type!r} is not one of {ANSWER_TYPES}")
        if not isinstance(self.source, str):
            raise ValueError(f"field 'source' must be a string, got {self.source!r}")
        if self.vision_dependent is not None and not isinstance(self.vision_dependent, bool):
            raise ValueError(
                f"field 'vision_dependent' must be true, false or null, got {self.vision_dependent!r}"
            )
        if self.solution is not None and not isinstance(self.solution, str):
            raise ValueError(f"field 'solution' must be a string or null, got {self.solution!r}")
        if not self.images:
            raise ValueError("no images (PAPO needs at least one image per prompt)")
        if self.masked_images and len(self.masked_images) != len(self.images):
            raise ValueError(f"{len(self.masked_images)} masked images for {len(self.images)} images")

    def tar_members(self, key: str) -> dict[str, bytes]:
        """The webdataset sample dict (``__key__`` plus suffix -> bytes); validates first."""
        self.validate()
        meta = {
            "id": self.uid,
            "prompt": self.prompt,
            "answer": self.answer,
            "answer_type": self.answer_type,
            "source": self.source,
            "vision_dependent": self.vision_dependent,
            "num_images": len(self.images),
            "num_masked_images": len(self.masked_images),
            "solution": self.solution,
            "extra": self.extra,
        }
        members: dict[str, bytes] = {
            "__key__": key,
            JSON_SUFFIX: json.dumps(meta, ensure_ascii=False).encode(),
        }
        sizes = []
        for i, data in enumerate(self.images):
            ext, size = _inspect(data, f"image {i}")
            members[image_suffix(i, ext)] = data
            sizes.append(size)
        for i, data in enumerate(self.masked_images):
            ext, size = _inspect(data, f"masked image {i}")
            if size != sizes[i]:
                raise ValueError(
                    f"masked image {i} is {size[0]}x{size[1]}, its image is {sizes[i][0]}x{sizes[i][1]}"
                )
            members[masked_suffix(i, ext)] = data
        return members


def _inspect(data: bytes, what: str) -> tuple[str, tuple[int, int]]:
    try:
        return inspect_image(data)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e
