"""Writes that survive a crash or a power loss: the data is fsynced before a rename publishes it, and
the directory holding the renamed entry is fsynced after it (POSIX leaves a rename in the page cache
until then)."""

from __future__ import annotations

import os


def fsync_path(path: str) -> None:
    """Flush ``path`` (a file or a directory: its entries) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(src: str, dst: str) -> None:
    """``os.replace(src, dst)``, then fsync the directory that holds ``dst``."""
    os.replace(src, dst)
    fsync_path(os.path.dirname(os.path.abspath(dst)))


def write_text_durably(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: a reader sees the old or the new content, never a mix
    or an empty file, also after a crash."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    durable_replace(tmp, path)


def fsync_tree(root: str, rank: int = 0, world_size: int = 1) -> None:
    """Fsync this rank's share of the files under ``root`` (every ``world_size``-th in sorted order, from
    ``rank``), so that the ranks of a job flush a checkpoint together; rank 0 also flushes the
    directories."""
    files, dirs = [], [root]
    for parent, subdirs, names in os.walk(root):
        files += [os.path.join(parent, n) for n in names]
        dirs += [os.path.join(parent, d) for d in subdirs]
    for path in sorted(files)[rank::world_size]:
        fsync_path(path)
    if rank == 0:
        for path in dirs:
            fsync_path(path)
