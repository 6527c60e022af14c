"""The shard list of a data set with per-shard sample counts: ``manifest.json``, or a scan of a pattern.

The reader needs every shard's sample count up front: it splits each epoch's sample sequence across
data-parallel ranks by position, so ranks get equal shares without reading each other's shards.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from dataclasses import dataclass

import braceexpand
from webdataset.tariterators import base_plus_ext

from megatron_papo.data.records import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "megatron-papo-shards/1"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInfo:
    """One ``.tar`` shard: absolute path, sample count, file size (``None``: not recorded)."""

    path: str
    num_samples: int
    num_bytes: int | None = None


@dataclass(frozen=True)
class Manifest:
    """The shards of one data split, in their canonical order."""

    shards: tuple[ShardInfo, ...]
    origin: str

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


def write_manifest(directory: str, shards: list[ShardInfo], extra: dict | None = None) -> str:
    """Write ``directory/manifest.json`` (shard paths relative to it) atomically; return its path."""
    path = os.path.join(directory, MANIFEST_NAME)
    body = {
        "format": MANIFEST_FORMAT,
        "num_samples": sum(s.num_samples for s in shards),
        "shards": [
            {
                "path": os.path.relpath(s.path, directory),
                "num_samples": s.num_samples,
                "num_bytes": s.num_bytes,
            }
            for s in shards
        ],
        **(extra or {}),
    }
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_manifest(path: str) -> Manifest:
    """Read a manifest; errors name the file and the entry that is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            body = json.load(f)
    except FileNotFoundError as e:
        raise DataError(f"manifest {path} does not exist") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"manifest {path} is not valid UTF-8 JSON: {e}") from e
    if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
        raise DataError(
            f"manifest {path}: expected format {MANIFEST_FORMAT!r} (written by tools/make_shards.py)"
        )
    root = os.path.dirname(os.path.abspath(path))
    shards = []
    for i, entry in enumerate(body.get("shards", [])):
        try:
            shard_path, count = entry["path"], entry["num_samples"]
            if not isinstance(shard_path, str) or not isinstance(count, int) or count < 0:
                raise TypeError
        except (KeyError, TypeError) as e:
            raise DataError(f"manifest {path}: shard entry {i} needs a 'path' and 'num_samples' >= 0") from e
        shards.append(ShardInfo(os.path.join(root, shard_path), count, entry.get("num_bytes")))
    return Manifest(tuple(shards), origin=path)


def count_shard(path: str) -> int:
    """Number of samples (consecutive runs of one key) in a ``.tar`` shard, from its headers only.

    A tar that stops without its end-of-archive blocks (two zero blocks) was cut short: Python's tarfile
    would end the listing there without a word, so this raises naming the shard.
    """
    keys = 0
    previous = None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                prefix, _ = base_plus_ext(member.name)
                if prefix is not None and prefix != previous:
                    keys += 1
                    previous = prefix
            end = tar.offset
        with open(path, "rb") as f:
            f.seek(end)
            marker = f.read(2 * tarfile.BLOCKSIZE)
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"shard {path}: cannot read tar headers ({type(e).__name__}: {e})") from e
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
        raise DataError(
            f"shard {path}: the tar stops after {keys} samples (last key {previous!r}) without its "
            "end-of-archive blocks: truncated"
        )
    return keys


def open_source(source: str, skip_bad: bool) -> tuple[Manifest, list[str]]:
    """The usable shards of a data source, and a message per shard left out (logged).

    ``source``: a manifest path, or brace/glob patterns of ``.tar`` shards (comma-separated; counted by a
    header scan). A missing file always raises. An empty shard, an unreadable tar, or a size that differs
    from the manifest (a truncated or rewritten shard) raises naming the shard, unless ``skip_bad``: then
    an empty or unreadable shard is left out and a size mismatch is read as far as it goes.
    """
    skipped: list[str] = []

    def problem(message: str) -> None:
        if not skip_bad:
            raise DataError(message)
        logger.warning("skipping: %s", message)
        skipped.append(message)

    if source.endswith(".json"):
        listed = load_manifest(source).shards
    else:
        listed = tuple(ShardInfo(os.path.abspath(p), -1) for p in _expand(source))
        logger.info(
            "counting samples in %d shards of %s (a manifest.json avoids this scan)", len(listed), source
        )
    kept = []
    for shard in listed:
        if not os.path.isfile(shard.path):
            raise DataError(f"shard {shard.path} (from {source}) does not exist")
        if shard.num_samples < 0:
            try:
                shard = ShardInfo(shard.path, count_shard(shard.path))
            except DataError as e:
                problem(str(e))
                continue
        size = os.path.getsize(shard.path)
        if shard.num_bytes is not None and size != shard.num_bytes:
            message = (
                f"shard {shard.path}: {size} bytes on disk but {shard.num_bytes} in {source} "
                "(truncated or rewritten since the manifest was made)"
            )
            if not skip_bad:
                raise DataError(message)
            logger.warning("%s; reading what it holds, its unreadable samples are skipped", message)
        if shard.num_samples == 0:
            problem(f"shard {shard.path} holds no samples")
            continue
        kept.append(shard)
    if not kept:
        raise DataError(f"data source {source} holds no readable samples")
    return Manifest(tuple(kept), origin=source), skipped


def _expand(source: str) -> list[str]:
    paths: list[str] = []
    for part in source.split(","):
        for pattern in braceexpand.braceexpand(part.strip()):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not matches:
                raise DataError(f"data source {source!r}: pattern {pattern!r} matches no file")
            paths.extend(matches)
    return paths
