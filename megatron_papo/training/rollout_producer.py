"""Step batches generated ahead of the trainer on a background thread (``rollout.max_staleness`` > 0).

The training thread *grants* steps, in order (``grant``); the producer thread generates each granted
step's batch (``produce(step)``: prompts, rollouts, rewards, masked images) and keeps it until the trainer
``take``s it. At most ``max_staleness`` steps are granted beyond the one training: that is the bound of the
queue. Before a step's prompts are read, the producer records where the prompt stream stood
(``data_position()``); ``position(step)`` gives that back, so a checkpoint taken while batches are generated
but not trained resumes from the first untrained step's prompts (the batches themselves are dropped and
regenerated, with the resumed weights): no prompt is lost or used twice.

Weight versions. The engine's weights only change while the producer is idle: the trainer calls
``wait_idle`` (every granted batch generated) before it syncs new weights, and grants the next steps after
the sync. So a batch is generated with one version throughout (a server never serves two versions inside
one group), and step ``k + s``, granted when step ``k`` starts, gets the weights step ``k`` trains from:
with ``max_staleness`` 1, batch ``k + 1`` is generated with version ``k - 1`` while step ``k`` updates.

The producer thread runs collectives only on groups of its own (``RolloutGroups.private``); its errors are
raised on the training thread by the next ``take`` / ``wait_idle`` / ``position``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class ProducerStopped(RuntimeError):
    """The producer was closed while the trainer still waited on it."""


class RolloutProducer(Generic[T]):
    """Generates the batches of granted steps, in order, on a daemon thread.

    ``produce(step)``: the batch of ``step`` (runs on the thread); ``data_position()``: where the prompt
    stream stands now (a loader state dict; called on the thread before each batch, and on the training
    thread while the producer is idle). ``granted``: the last step granted (steps before ``first_step``
    count as granted and taken). ``busy_s``: seconds spent producing so far.
    """

    def __init__(
        self,
        produce: Callable[[int], T],
        data_position: Callable[[], dict[str, Any]],
        first_step: int = 1,
        name: str = "rollout-producer",
    ) -> None:
        self._produce = produce
        self._data_position = data_position
        self._cond = threading.Condition()
        self._pending: deque[int] = deque()  # granted, not started
        self._running: int | None = None
        self._done: dict[int, T] = {}
        self._positions: dict[int, dict[str, Any]] = {}  # started, not taken: the position before it
        self._error: BaseException | None = None
        self._closed = False
        self.granted = first_step - 1
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def grant(self, step: int) -> None:
        """Let the producer generate ``step``'s batch (the step after the last granted one)."""
        with self._cond:
            if step != self.granted + 1:
                raise ValueError(f"rollout producer: granted step {step} after step {self.granted}")
            self.granted = step
            self._pending.append(step)
            self._cond.notify_all()

    def take(self, step: int) -> T:
        """``step``'s batch (granted), once generated."""
        with self._cond:
            if step > self.granted:
                raise ValueError(f"rollout producer: step {step} taken before it was granted")
            self._wait(lambda: step in self._done)
            del self._positions[step]
            return self._done.pop(step)

    def wait_idle(self) -> None:
        """Until every granted batch is generated (the engine is then free for a weight sync)."""
        with self._cond:
            self._wait(self._idle)

    def position(self, step: int) -> dict[str, Any]:
        """Where the prompts of ``step`` start: recorded before its batch when it was started and not taken
        yet, else the stream's position once the producer is idle (``step`` is then the next to read)."""
        with self._cond:
            self._wait(lambda: step in self._positions or self._idle())
            if step in self._positions:
                return self._positions[step]
            return self._data_position()

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop after the batch in progress (granted ones not started are dropped); the thread is a daemon,
        so a batch stuck in a collective with a failed rank does not keep the process alive."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _idle(self) -> bool:
        """Every granted batch generated (never after a failure: the failed one was not)."""
        return not self._pending and self._running is None and self._error is None

    def _wait(self, ready: Callable[[], bool]) -> None:
        """Wait (holding ``_cond``) until ``ready()``; raise the producer's error, or that it is closed,
        if it never will be."""
        self._cond.wait_for(lambda: ready() or self._error is not None or self._closed)
        if ready():
            return
        if self._error is not None:
            raise RuntimeError("the rollout producer thread failed") from self._error
        raise ProducerStopped("the rollout producer was closed")

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._pending or self._closed)
                    if self._closed:
                        return
                    step = self._running = self._pending.popleft()
                    self._positions[step] = self._data_position()
                start = time.monotonic()
                batch = self._produce(step)
                with self._cond:
                    self.busy_s += time.monotonic() - start
                    self._done[step] = batch
                    self._running = None
                    self._cond.notify_all()
        except BaseException as e:  # handed to the training thread
            with self._cond:
                self._error = e
                self._running = None
                self._cond.notify_all()
