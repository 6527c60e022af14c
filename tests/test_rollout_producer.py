"""Rollouts ahead of the trainer, without a model: the producer thread's order, bound, data positions and
errors; the version schedule of ``rollout.max_staleness``; the staleness and importance-weight figures; the
embedded engine's log-probs of its samples."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from megatron_papo.rollout.config import RolloutConfig
from megatron_papo.rollout.correction import importance_weight_stats
from megatron_papo.rollout.embedded import sampled_logprobs
from megatron_papo.rollout.staleness import StaleRolloutError, staleness_metrics
from megatron_papo.training.rollout_producer import RolloutProducer


class Stream:
    """A prompt stream: ``read(k)`` hands out the next ``k`` indices; its position is the next index."""

    def __init__(self) -> None:
        self.next = 0

    def read(self, count: int) -> list[int]:
        out = list(range(self.next, self.next + count))
        self.next += count
        return out

    def position(self) -> dict:
        return {"next_index": self.next}


class Engine:
    """Weights of one version at a time; a batch records every version it saw while generating."""

    def __init__(self) -> None:
        self.version = 0
        self.busy = threading.Event()

    def generate(self, rows: int) -> list[int]:
        self.busy.set()
        seen = []
        for _ in range(rows):
            seen.append(self.version)
            time.sleep(0.002)
        self.busy.clear()
        return seen


def _run(max_staleness: int, steps: int) -> dict:
    """The trainer's schedule (``Trainer._take_ahead`` and the sync after the update) over a fake engine:
    per step the prompts and the versions its batch was generated with, and the data positions a save
    after each step records."""
    stream, engine = Stream(), Engine()
    producer = RolloutProducer(lambda step: (stream.read(2), engine.generate(4)), stream.position)
    prompts, versions, positions = {}, {}, {}
    try:
        for step in range(1, steps + 1):
            for ahead in range(producer.granted + 1, min(step + max_staleness, steps) + 1):
                producer.grant(ahead)
            prompts[step], versions[step] = producer.take(step)
            time.sleep(0.005)  # the update, while the producer generates ahead
            producer.wait_idle()
            assert not engine.busy.is_set()
            engine.version = step  # the weight sync: only while the producer is idle
            positions[step] = producer.position(step + 1)
    finally:
        producer.close()
    return {"prompts": prompts, "versions": versions, "positions": positions}


@pytest.mark.parametrize("max_staleness", [1, 2])
def test_each_batch_is_generated_with_one_version_at_most_max_staleness_old(max_staleness):
    out = _run(max_staleness, steps=6)
    for step, seen in out["versions"].items():
        assert len(set(seen)) == 1, f"step {step} mixed versions {seen}"
        assert seen[0] == max(step - 1 - max_staleness, 0), (step, seen)
    # the prompts come in stream order, each once
    assert [i for step in sorted(out["prompts"]) for i in out["prompts"][step]] == list(range(12))


def test_a_save_records_the_first_untrained_steps_prompts_and_a_resume_repeats_the_order():
    whole = _run(1, steps=6)
    # after step k, step k + 1's batch was generated already: the position is before its prompts
    assert [whole["positions"][k]["next_index"] for k in range(1, 7)] == [2, 4, 6, 8, 10, 12]
    # a run resumed from the step-3 save reads step 4's prompts again, and the rest as the whole run did
    resumed = Stream()
    resumed.next = whole["positions"][3]["next_index"]
    producer = RolloutProducer(lambda step: resumed.read(2), resumed.position, first_step=4)
    try:
        for step in range(4, 7):
            producer.grant(step)
            assert producer.take(step) == whole["prompts"][step]
    finally:
        producer.close()


def test_grants_are_in_order_and_takes_need_a_grant():
    producer = RolloutProducer(lambda step: step, lambda: {}, first_step=3)
    try:
        with pytest.raises(ValueError, match="granted step 5 after step 2"):
            producer.grant(5)
        with pytest.raises(ValueError, match="before it was granted"):
            producer.take(3)
        producer.grant(3)
        assert producer.take(3) == 3 and producer.granted == 3
    finally:
        producer.close()


def test_an_error_on_the_producer_thread_is_raised_on_the_trainers():
    def produce(step: int) -> int:
        if step == 2:
            raise KeyError("boom")
        return step

    producer = RolloutProducer(produce, lambda: {})
    try:
        producer.grant(1)
        producer.grant(2)
        assert producer.take(1) == 1
        with pytest.raises(RuntimeError, match="producer thread failed") as info:
            producer.take(2)
        assert isinstance(info.value.__cause__, KeyError)
        with pytest.raises(RuntimeError):
            producer.wait_idle()
    finally:
        producer.close()


def test_staleness_metrics_and_refusals():
    assert staleness_metrics([3, 3, 2, 2], step=5, max_staleness=2) == {
        "rollout/staleness": 1.5,
        "rollout/staleness_max": 2.0,
        "rollout/weight_version_min": 2.0,
        "rollout/weight_version_max": 3.0,
    }
    with pytest.raises(StaleRolloutError, match="more than rollout.max_staleness=1"):
        staleness_metrics([2], step=5, max_staleness=1)
    with pytest.raises(StaleRolloutError, match="ahead"):
        staleness_metrics([5], step=5, max_staleness=1)
    with pytest.raises(StaleRolloutError, match="without a weight version"):
        staleness_metrics([4, None], step=5, max_staleness=1)


def test_importance_weight_stats_over_response_tokens():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.3, 0.3]]))
    rollout = torch.log(torch.tensor([[0.25, 0.4, 0.1], [0.3, 0.6, 0.3]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # row 0's last token is padding
    stats = importance_weight_stats(old, rollout, mask, cap=1.5)
    ratios = [2.0, 0.5, 1.0, 0.5, 1.0]
    assert math.isclose(stats["rollout/is_weight_mean"], sum(ratios) / 5, rel_tol=1e-6)
    assert math.isclose(stats["rollout/is_weight_min"], 0.5, rel_tol=1e-6)
    assert math.isclose(stats["rollout/is_weight_max"], 2.0, rel_tol=1e-6)
    assert stats["rollout/is_weight_capped"] == pytest.approx(0.2)
    assert "rollout/is_weight_capped" not in importance_weight_stats(old, rollout, mask, cap=None)


def test_sampled_logprobs_pick_each_token_from_its_steps_distribution():
    scores = (torch.tensor([[0.0, 1.0, -math.inf], [2.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0]] * 2))
    tokens = torch.tensor([[1, 2], [0, 0]])
    want = torch.tensor(
        [[float(s.log_softmax(-1)[r, tokens[r, i]]) for i, s in enumerate(scores)] for r in range(2)]
    )
    assert torch.allclose(sampled_logprobs(scores, tokens), want)


def test_config_staleness_and_engine_logprobs():
    assert not RolloutConfig().engine_logprobs
    assert RolloutConfig(max_staleness=1).engine_logprobs
    assert RolloutConfig(tis_cap=2.0).engine_logprobs  # the embedded engine reports them for TIS too
    with pytest.raises(ValueError, match="max_staleness must be >= 0"):
        RolloutConfig(max_staleness=-1)
