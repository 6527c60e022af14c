"""JSONL / Parquet rows -> shard samples (``tools/make_shards.py``).

A row holds a prompt, an answer and its images as file paths (relative to ``image_root``, else to the
input file's folder), raw bytes, ``data:`` base64 URIs, or ``{"bytes": ..., "path": ...}`` dicts (the
Hugging Face image feature), alone or in a list (multi-image). ``RowSchema`` maps the column names; the
ViRL39K layout is ``RowSchema(id_key="qid", prompt_key="question", images_key="image")``.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from megatron_papo.data.records import DataError
from megatron_papo.data.shard_format import ShardSample, json_object
from megatron_papo.data.shard_writer import ShardWriter

logger = logging.getLogger(__name__)


@dataclass
class RowSchema:
    """Column names of the input rows; optional columns may be absent (``None``: never read)."""

    id_key: str = "id"
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    images_key: str = "images"
    answer_type_key: str | None = "answer_type"
    default_answer_type: str = "math"
    source_key: str | None = "source"
    default_source: str = ""
    masked_images_key: str | None = "masked_images"
    vision_dependent_key: str | None = "vision_dependent"
    solution_key: str | None = "solution"


def iter_rows(path: str) -> Iterator[tuple[str, dict[str, Any] | bytes]]:
    """(location, row) for each row of a ``.jsonl`` or ``.parquet`` file; location is ``file:line N``. A
    JSONL row comes as its line, parsed by ``row_to_sample``: a malformed line is one bad row."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
        try:
            table = pq.ParquetFile(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e
        row = 0
        for batch in table.iter_batches(batch_size=256):
            for record in batch.to_pylist():
                yield f"{path}:row {row}", record
                row += 1
        return
    if not path.endswith(".jsonl"):
        raise DataError(f"{path}: input must be .jsonl or .parquet")
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            yield f"{path}:line {number}", line


def _image_bytes(value: Any, root: str) -> list[bytes]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [b for v in value for b in _image_bytes(v, root)]
    if isinstance(value, (bytes, bytearray)):
        return [bytes(value)]
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return [bytes(value["bytes"])]
        if value.get("path") is not None:
            return _image_bytes(value["path"], root)
        raise ValueError(f"image dict {sorted(value)} has neither 'bytes' nor 'path'")
    if isinstance(value, str):
        if value.startswith("data:"):
            return [base64.b64decode(value.partition(",")[2], validate=True)]
        path = os.path.join(root, value)
        try:
            with open(path, "rb") as f:
                return [f.read()]
        except OSError as e:
            raise ValueError(f"cannot read image file {path} ({e.strerror})") from e
    raise ValueError(f"an image must be a path, bytes, a data: URI or a dict, got {type(value).__name__}")


def _text(value: Any, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"column {name!r} must be text, got {value!r}")
    return str(value)


def row_to_sample(row: dict[str, Any] | bytes, schema: RowSchema, image_root: str) -> ShardSample:
    """One row (a JSONL line: parsed first) -> a validated ``ShardSample``; raises ValueError naming the
    column or image, or saying why the line is not a JSON object."""
    if isinstance(row, bytes):
        row = json_object(row)
    for name in (schema.id_key, schema.prompt_key, schema.answer_key, schema.images_key):
        if row.get(name) is None:
            raise ValueError(f"missing column {name!r} (row has {sorted(row)})")

    def optional(key: str | None, default: Any) -> Any:
        return default if key is None or row.get(key) is None else row[key]

    sample = ShardSample(
        uid=_text(row[schema.id_key], schema.id_key),
        prompt=_text(row[schema.prompt_key], schema.prompt_key),
        answer=_text(row[schema.answer_key], schema.answer_key).strip(),
        images=_image_bytes(row[schema.images_key], image_root),
        answer_type=optional(schema.answer_type_key, schema.default_answer_type),
        source=optional(schema.source_key, schema.default_source),
        vision_dependent=optional(schema.vision_dependent_key, None),
        solution=optional(schema.solution_key, None),
        masked_images=_image_bytes(optional(schema.masked_images_key, None), image_root),
    )
    sample.validate()
    return sample


def convert_rows(
    inputs: list[str],
    writer: ShardWriter,
    schema: RowSchema,
    image_root: str | None = None,
    skip_bad: bool = False,
) -> tuple[str, int]:
    """Write the rows of ``inputs`` through ``writer``; return (manifest path, rows skipped).

    A bad row raises naming its file and line, and nothing is published (no manifest); with ``skip_bad``
    it is logged and counted instead, and the manifest records the count (``rows_skipped``).
    """
    skipped = 0
    with writer:
        for path in inputs:
            root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
            for location, row in iter_rows(path):
                try:
                    writer.write(row_to_sample(row, schema, root))
                except (ValueError, TypeError) as e:
                    if not skip_bad:
                        raise DataError(f"{location}: {e}") from e
                    skipped += 1
                    logger.warning("skipped %s: %s (%d skipped so far)", location, e, skipped)
        writer.manifest_extra["rows_skipped"] = skipped
        return writer.close(), skipped
