"""Rolling webdataset shard writer: each ``.tar`` is written aside and renamed into place when complete.

Shards roll over at a target size (bytes) or sample count; ``close()`` writes ``manifest.json`` last,
so a data set directory either has a manifest listing only complete shards or no manifest at all.
Tar headers carry fixed metadata (mtime 0), so the same samples give byte-identical shards.
"""

from __future__ import annotations

import glob
import os

from webdataset import TarWriter

from megatron_papo.data.manifest import MANIFEST_NAME, ShardInfo, write_manifest
from megatron_papo.data.records import DataError
from megatron_papo.data.shard_format import ShardSample, sample_key

TAR_BLOCK = 512


def _tar_size(members: dict[str, bytes]) -> int:
    """Bytes the members take in a tar: a header block each plus data padded to whole blocks."""
    return sum(TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for k, v in members.items() if k != "__key__")


class ShardWriter:
    """Write ``ShardSample``s to ``out_dir/{prefix}-000000.tar``, ... and ``out_dir/manifest.json``.

    Use as a context manager: on an exception the unfinished shard is removed and no manifest is written
    (complete shards stay). An existing manifest or shards of the same prefix raise unless ``overwrite``;
    then the old shards are replaced, and those beyond the new count removed when the new set is complete.
    """

    def __init__(
        self,
        out_dir: str,
        prefix: str = "shard",
        max_bytes: int = 256 << 20,
        max_samples: int | None = None,
        overwrite: bool = False,
        manifest_extra: dict | None = None,
    ) -> None:
        if max_bytes < 1 or (max_samples is not None and max_samples < 1):
            raise ValueError(
                f"shard limits must be >= 1, got max_bytes={max_bytes} max_samples={max_samples}"
            )
        os.makedirs(out_dir, exist_ok=True)
        existing = glob.glob(os.path.join(out_dir, f"{prefix}-*.tar")) + glob.glob(
            os.path.join(out_dir, MANIFEST_NAME)
        )
        if existing and not overwrite:
            raise DataError(f"{out_dir} already holds a data set ({sorted(existing)[0]} ...); pass overwrite")
        if os.path.exists(os.path.join(out_dir, MANIFEST_NAME)):
            os.remove(os.path.join(out_dir, MANIFEST_NAME))  # never leave a manifest of a half-rewritten set
        self.out_dir, self.prefix = out_dir, prefix
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self.manifest_extra = manifest_extra or {}
        self.shards: list[ShardInfo] = []
        self.total = 0
        self._file = self._tar = None
        self._count = self._bytes = 0

    def _path(self) -> str:
        return os.path.join(self.out_dir, f"{self.prefix}-{len(self.shards):06d}.tar")

    def write(self, sample: ShardSample) -> None:
        """Append one sample (validated; raises ValueError naming the problem, nothing written then)."""
        members = sample.tar_members(sample_key(self.total))
        size = _tar_size(members)
        full = self._count and (
            self._bytes + size > self.max_bytes or (self.max_samples and self._count >= self.max_samples)
        )
        if full:
            self._finish_shard()
        if self._tar is None:
            self._file = open(self._path() + ".tmp", "wb")
            self._tar = TarWriter(self._file, encoder=False, mtime=0, user="papo", group="papo")
        self._tar.write(members)
        self._count, self._bytes, self.total = self._count + 1, self._bytes + size, self.total + 1

    def _finish_shard(self) -> None:
        path = self._path()
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(path + ".tmp", path)
        self.shards.append(ShardInfo(path, self._count, os.path.getsize(path)))
        self._file = self._tar = None
        self._count = self._bytes = 0

    def close(self) -> str:
        """Finish the last shard, drop shards of this prefix left by an older set, write the manifest;
        return the manifest's path."""
        if self._tar is not None:
            self._finish_shard()
        if not self.shards:
            raise DataError(f"no samples were written to {self.out_dir}")
        written = {s.path for s in self.shards}
        for stale in glob.glob(os.path.join(self.out_dir, f"{self.prefix}-*.tar")):
            if stale not in written:
                os.remove(stale)
        return write_manifest(self.out_dir, self.shards, self.manifest_extra)

    def abort(self) -> None:
        """Drop the unfinished shard (complete shards stay, no manifest)."""
        if self._file is not None:
            self._file.close()
            os.remove(self._path() + ".tmp")
        self._file = self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
