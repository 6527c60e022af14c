"""``PromptLoader``: streams encoded prompts of one data-parallel rank, resumable from a small state dict.

Each DP rank builds its own loader (no communication). The order is fixed by the seed (see ``order``):
every sample comes exactly once per epoch across all ranks, the stream repeats over epochs (or makes one
pass with ``repeat=False``), and the same seed gives the same order for any number of loader workers.
The state dict holds the global index of the next prompt to hand out, so a resumed loader continues
without repeats or gaps; the trainer saves one state per DP rank (ranks may differ by skipped samples).

Bad samples raise ``BadSampleError`` (shard and key in the message), or with ``data.skip_bad_samples``
are logged, counted in ``skipped`` and passed over, up to ``data.max_consecutive_bad_samples`` in a row
(or a whole epoch of the rank's samples: all bad): then ``DataError``, instead of skipping forever. A
loader worker does not raise: it hands the error to the main process as an item, which raises it as it
was (torch would re-wrap it as a ``RuntimeError``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_papo.data.config import DataConfig
from megatron_papo.data.encode import EncodedPrompt, encode_prompt
from megatron_papo.data.manifest import Manifest, open_source
from megatron_papo.data.order import buffer_permutation, rank_range, rank_segments, worker_indices
from megatron_papo.data.records import (
    BadSampleError,
    DataError,
    PromptSample,
    RawSample,
    decode_sample,
    read_shard,
)
from megatron_papo.training.preemption import ignore_exit_signals

logger = logging.getLogger(__name__)
Encoder = Callable[[PromptSample], EncodedPrompt]


@dataclass
class _Skipped:
    index: int
    message: str


@dataclass
class _Delivered:
    index: int
    prompt: EncodedPrompt


@dataclass
class _Failed:
    error: DataError


class RankStream(IterableDataset):
    """The global indices ``[start, stop)`` of one DP rank's stream, split across DataLoader workers."""

    def __init__(
        self,
        manifest: Manifest,
        cfg: DataConfig,
        encoder: Encoder,
        dp_rank: int,
        dp_size: int,
        start: int,
        stop: int | None,
    ) -> None:
        self.manifest, self.cfg, self.encoder = manifest, cfg, encoder
        self.dp_rank, self.dp_size, self.start, self.stop = dp_rank, dp_size, start, stop
        lo, hi = rank_range(manifest.num_samples, dp_rank, dp_size)
        self.per_epoch = hi - lo

    def __iter__(self) -> Iterator[_Delivered | _Skipped | _Failed]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.start // self.per_epoch
        try:
            while self.stop is None or epoch * self.per_epoch < self.stop:
                base = epoch * self.per_epoch
                hi = base + self.per_epoch if self.stop is None else min(base + self.per_epoch, self.stop)
                mine = worker_indices(self.start, base, hi, worker, num_workers)
                positions = np.arange(mine.start, mine.stop, mine.step, dtype=np.int64) - base
                yield from self._epoch(epoch, positions)
                epoch += 1
        except DataError as e:
            yield _Failed(e)

    def _epoch(self, epoch: int, positions: np.ndarray) -> Iterator[_Delivered | _Skipped]:
        """Produce the given positions of ``epoch`` (sorted), reading each needed sample once."""
        if len(positions) == 0:
            return
        cfg = self.cfg
        perm = buffer_permutation(
            self.per_epoch, cfg.shuffle_buffer if cfg.shuffle else 0, cfg.seed, epoch, self.dp_rank
        )
        needed = np.sort(perm[positions])
        inputs = self._inputs(epoch, needed)
        held: dict[int, RawSample] = {}
        for position in positions:
            want = int(perm[position])
            while want not in held:
                index, raw = next(inputs)
                held[index] = raw
            yield self._process(held.pop(want), epoch, int(position))

    def _inputs(self, epoch: int, needed: np.ndarray) -> Iterator[tuple[int, RawSample]]:
        """(input index, raw sample) for the ``needed`` input indices (sorted) of ``epoch``, in order."""
        shards = self.manifest.shards
        counts = [s.num_samples for s in shards]
        offset = 0
        for seg in rank_segments(counts, self.cfg.seed, epoch, self.cfg.shuffle, self.dp_rank, self.dp_size):
            length = seg.stop - seg.start
            lo, hi = np.searchsorted(needed, [offset, offset + length])
            if lo < hi:
                shard = shards[seg.shard]
                want = set((needed[lo:hi] - offset + seg.start).tolist())
                last = int(needed[hi - 1]) - offset + seg.start
                reader = read_shard(
                    shard.path, seg.start, seg.stop, shard.num_samples, self.cfg.skip_bad_samples
                )
                for raw in reader:
                    if raw.index_in_shard in want:
                        yield offset + raw.index_in_shard - seg.start, raw
                    if raw.index_in_shard == last:
                        reader.close()
                        break
            offset += length

    def _process(self, raw: RawSample, epoch: int, position: int) -> _Delivered | _Skipped:
        index = epoch * self.per_epoch + position
        try:
            prompt = self.encoder(decode_sample(raw, self.cfg.max_image_pixels))
        except Exception as e:  # any failure on one sample is reported with its shard and key
            error = (
                e
                if isinstance(e, BadSampleError)
                else BadSampleError(raw.shard, raw.key, f"{type(e).__name__}: {e}")
            )
            if not self.cfg.skip_bad_samples:
                raise error from e
            return _Skipped(index, str(error))
        prompt.epoch, prompt.position = epoch, position
        return _Delivered(index, prompt)


def _identity(x):
    return x


class PromptLoader:
    """Encoded prompts of one DP rank: ``for prompt in loader`` (endless with ``repeat``, else one pass).

    ``samples_per_epoch``: prompts this rank gets per epoch (equal across ranks up to one).
    ``state_dict()`` / ``load_state_dict()``: the position to resume from (a few ints).
    """

    def __init__(
        self,
        source: str,
        cfg: DataConfig,
        encoder: Encoder,
        dp_rank: int,
        dp_size: int,
        repeat: bool = True,
    ) -> None:
        self.cfg, self.encoder, self.dp_rank, self.dp_size, self.repeat = (
            cfg,
            encoder,
            dp_rank,
            dp_size,
            repeat,
        )
        self.manifest, skipped_shards = open_source(source, cfg.skip_bad_samples)
        lo, hi = rank_range(self.manifest.num_samples, dp_rank, dp_size)
        self.samples_per_epoch = hi - lo
        self.skipped_shards = len(skipped_shards)
        self.skipped = 0
        self._next = 0

    @property
    def epoch(self) -> int:
        """The epoch of the next prompt."""
        return self._next // self.samples_per_epoch

    def __iter__(self) -> Iterator[EncodedPrompt]:
        stop = None if self.repeat else self.samples_per_epoch
        stream = RankStream(
            self.manifest, self.cfg, self.encoder, self.dp_rank, self.dp_size, self._next, stop
        )
        workers = self.cfg.num_workers
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            prefetch_factor=self.cfg.prefetch_factor if workers else None,
            worker_init_fn=ignore_exit_signals,
        )
        limit = min(self.cfg.max_consecutive_bad_samples, self.samples_per_epoch)
        in_a_row = 0
        for item in loader:
            if isinstance(item, _Failed):
                raise item.error
            if item.index != self._next:
                raise RuntimeError(f"data loader out of order: got index {item.index}, expected {self._next}")
            self._next += 1
            if isinstance(item, _Delivered):
                in_a_row = 0
                yield item.prompt
                continue
            self.skipped += 1
            in_a_row += 1
            logger.warning("skipped a bad sample (%d so far on this rank): %s", self.skipped, item.message)
            if in_a_row >= limit:
                what = (
                    f"all {in_a_row} samples of data-parallel rank {self.dp_rank}'s epoch are bad"
                    if in_a_row == self.samples_per_epoch
                    else f"{in_a_row} bad samples in a row (data.max_consecutive_bad_samples)"
                )
                raise DataError(f"{self.manifest.origin}: {what}; the last: {item.message}")

    def state_dict(self) -> dict:
        return {
            "next_index": self._next,
            "skipped": self.skipped,
            "num_samples": self.manifest.num_samples,
            "seed": self.cfg.seed,
            "shuffle": self.cfg.shuffle,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; raises if the data set or the order settings changed since saved."""
        current = self.state_dict()
        for name in ("num_samples", "seed", "shuffle", "shuffle_buffer", "dp_rank", "dp_size"):
            if state.get(name) != current[name]:
                raise ValueError(
                    f"cannot resume the data loader of {self.manifest.origin}: {name} was "
                    f"{state.get(name)!r} "
                    f"when saved, now {current[name]!r} (the order would differ)"
                )
        self._next, self.skipped = int(state["next_index"]), int(state["skipped"])


def build_prompt_loader(
    source: str,
    cfg: DataConfig,
    tokenizer,
    image_processor,
    dp_rank: int,
    dp_size: int,
    repeat: bool = True,
) -> PromptLoader:
    """A ``PromptLoader`` encoding with ``encode_prompt(sample, tokenizer, image_processor, cfg)``."""
    encoder = functools.partial(encode_prompt, tokenizer=tokenizer, image_processor=image_processor, cfg=cfg)
    return PromptLoader(source, cfg, encoder, dp_rank, dp_size, repeat)
