"""The seed-determined sample order of each epoch and its split across DP ranks and loader workers.

Epoch ``e`` of a data set with shards of sizes ``counts``:

1. the shards are put in a permuted order (seeded by (seed, e); identity without shuffling);
2. the concatenated N samples are cut into DP-rank ranges ``[r*N//dp, (r+1)*N//dp)`` by position, so a
   rank reads only the shards (and parts of shards) of its range: every sample belongs to exactly one
   rank, and each rank has the same ``samples_per_rank`` in every epoch;
3. each rank's range goes through webdataset's shuffle buffer (seeded by (seed, e, rank)). The buffer's
   output order depends only on the number of inputs and its RNG, so it is computed on the input
   indices once (``buffer_permutation``) and the samples themselves are only read, never buffered whole.

The rank's stream is the epochs one after another: global index ``g = e * samples_per_rank + position``.
Loader workers take turns, counted from the index the iteration starts at (``worker_indices``), which is
the order in which torch's DataLoader hands out their results, so the rank's order does not depend on
the number of workers.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import webdataset as wds


@dataclass(frozen=True)
class Segment:
    """Samples ``start <= i < stop`` of shard number ``shard``."""

    shard: int
    start: int
    stop: int


def _rng(*keys: int) -> random.Random:
    return random.Random(int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]))


def rank_range(num_samples: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """The positions ``[lo, hi)`` of the epoch sequence that belong to ``dp_rank``."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
    if num_samples < dp_size:
        raise ValueError(
            f"the data set has {num_samples} samples, fewer than the {dp_size} data-parallel ranks"
        )
    return dp_rank * num_samples // dp_size, (dp_rank + 1) * num_samples // dp_size


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(num_shards))
    if shuffle:
        _rng(seed, epoch).shuffle(order)
    return order


def rank_segments(
    counts: Sequence[int], seed: int, epoch: int, shuffle: bool, dp_rank: int, dp_size: int
) -> list[Segment]:
    """The shard pieces making up ``dp_rank``'s inputs in ``epoch``, in input order."""
    lo, hi = rank_range(sum(counts), dp_rank, dp_size)
    segments, offset = [], 0
    for shard in shard_order(len(counts), seed, epoch, shuffle):
        start, stop = max(lo - offset, 0), min(hi - offset, counts[shard])
        if start < stop:
            segments.append(Segment(shard, start, stop))
        offset += counts[shard]
    return segments


def buffer_permutation(n: int, buffer_size: int, seed: int, epoch: int, dp_rank: int) -> np.ndarray:
    """``perm[position]`` = input index for webdataset's shuffle buffer on ``n`` inputs ([n] int64)."""
    if buffer_size <= 1:
        return np.arange(n, dtype=np.int64)
    shuffle = wds.filters.shuffle(buffer_size, initial=buffer_size, rng=_rng(seed, epoch, dp_rank, 1))
    return np.fromiter(shuffle(iter(range(n))), dtype=np.int64, count=n)


def worker_indices(start: int, lo: int, hi: int, worker: int, num_workers: int) -> range:
    """The indices in ``[lo, hi)`` that ``worker`` produces when iteration starts at ``start``.

    Workers take turns from ``start``: worker ``w`` owns ``start + w + k * num_workers`` for k >= 0.
    """
    first = start + worker
    if first < lo:
        first += -(-(lo - first) // num_workers) * num_workers
    return range(first, hi, num_workers)
