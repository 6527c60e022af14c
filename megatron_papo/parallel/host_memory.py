"""Freed host memory handed back to the operating system (glibc), between the pieces of a streamed export;
a process's resident memory and its peak, for the benchmarks that measure them.

glibc keeps freed blocks in its arenas (one per thread that allocated: gloo's receive threads have their
own) and raises its mmap threshold after large frees, so blocks of many sizes, each freed, can stay
resident side by side: a rank's resident memory then grows with the number of differently sized pieces it
has handled, not with the pieces alive at once. ``malloc_trim(0)`` returns the free pages of every arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "malloc_trim") else None  # musl, macOS: no malloc_trim


_LIBC = _glibc()


def release_freed_memory() -> None:
    """Return the free pages of every malloc arena to the OS (a no-op without glibc)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's ``VmRSS`` (resident now) or ``VmHWM`` (its high-water mark), in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_resident_peak() -> int:
    """Hand the freed blocks back, then reset ``VmHWM`` to the resident size (Linux >= 4.0); that size,
    in bytes: a measured peak over it is what the code measured after it needed."""
    release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return resident_bytes()


def trimmed(items: Iterator[T]) -> Iterator[T]:
    """``items``, with ``release_freed_memory()`` each time the consumer asks for the next one (by then
    it has dropped all but the item it still holds)."""
    for item in items:
        yield item
        del item
        release_freed_memory()
