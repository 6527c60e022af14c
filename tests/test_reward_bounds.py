"""Rewards cannot stall a step: adversarial answers are graded in linear time or killed at the per-response
timeout of the reward worker pool (``megatron_papo.rewards.pool``); responses are cut before parsing."""

import multiprocessing
import os
import time

import pytest

from megatron_papo.rewards.boxed import last_boxed
from megatron_papo.rewards.config import RewardConfig
from megatron_papo.rewards.format import format_reward
from megatron_papo.rewards.pool import RewardError, RewardPool
from megatron_papo.rewards.registry import RewardOutput
from megatron_papo.training.preemption import EXIT_SIGNALS

THINK = "<think>x</think> "
ADVERSARIAL = {
    "power tower": (THINK + "\\boxed{9^{9^{9}}}", "3"),
    "5000 nested boxes": ("\\boxed{" * 5000, "3"),
    "format regex backtracking": ("<think>" + "</think>\\boxed{" * 800, "3"),  # 12,007 characters
    "5000-term sum": (THINK + "\\boxed{" + "+".join(["1"] * 5000) + "}", "5000"),
}
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def pool():
    pool = RewardPool(RewardConfig(timeout_s=TIMEOUT_S))
    yield pool
    pool.close()


@pytest.mark.timeout(60)
def test_parsers_are_linear_on_adversarial_text():
    """Box extraction and the format check read the text once (they took seconds to minutes)."""
    start = time.monotonic()
    assert last_boxed(ADVERSARIAL["5000 nested boxes"][0]) is None
    assert format_reward(ADVERSARIAL["format regex backtracking"][0]) == 0.0
    assert last_boxed("\\boxed{" * 5000 + "7" + "}" * 5000) == "7"
    assert time.monotonic() - start < 0.5


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_answer_finishes_within_its_cap(pool, name):
    """Each adversarial answer is graded (0) or its worker killed within the timeout; the pool then grades
    a plain answer correctly."""
    pool.grade([(THINK + "\\boxed{1}", "1", "math")])  # the worker is up
    pool.take_stats()
    start = time.monotonic()
    (out,) = pool.grade([(*ADVERSARIAL[name], "math")])
    elapsed = time.monotonic() - start
    stats = pool.take_stats()
    assert elapsed < TIMEOUT_S + 1.0, (name, elapsed)
    assert out.accuracy == 0.0 or name == "5000-term sum", out
    assert stats["reward/timeouts"] in (0.0, 1.0) and stats["perf/reward_s"] == pytest.approx(
        elapsed, abs=0.1
    )
    if stats["reward/timeouts"]:
        assert out == RewardOutput(0.0, 0.0, 0.0)
    assert pool.grade([(THINK + "\\boxed{2}", "2", "math")]) == [RewardOutput(1.0, 1.0, 1.0)]


USER_REWARD = """
import os
import time

from megatron_papo.rewards.registry import RewardOutput
from megatron_papo.training.preemption import EXIT_SIGNALS


def length(response, answer, answer_type):
    if response == "die":
        os._exit(3)
    if response == "sleep":
        time.sleep(60)
    return RewardOutput(float(len(response)), 0.0, 0.0)


def broken(response, answer, answer_type):
    return 0.5
"""


@pytest.mark.timeout(60)
def test_pool_cuts_responses_kills_stuck_and_dead_workers_and_raises_reward_bugs(tmp_path):
    (tmp_path / "user_reward.py").write_text(USER_REWARD)
    cfg = RewardConfig(f"{tmp_path}/user_reward.py:length", max_response_chars=100, timeout_s=1.0, workers=2)
    pool = RewardPool(cfg)
    try:
        items = [("x" * 1000, "", "math"), ("sleep", "", "math"), ("die", "", "math"), ("abc", "", "math")]
        start = time.monotonic()
        scores = [r.score for r in pool.grade(items)]
        assert time.monotonic() - start < 3.0
        assert scores == [100.0, 0.0, 0.0, 3.0]  # cut to 100 characters; killed; died; graded
        assert pool.take_stats()["reward/timeouts"] == 2.0
        assert [r.score for r in pool.grade([("ab", "", "math")] * 3)] == [2.0] * 3
    finally:
        pool.close()
    broken = RewardPool(RewardConfig(f"{tmp_path}/user_reward.py:broken"))
    with pytest.raises(RewardError, match="user_reward.py:broken failed on a response: TypeError: .*0.5"):
        broken.grade([("x", "y", "math")])
    assert broken.workers == []


def test_pool_workers_outlive_the_job_wide_signals(pool):
    """SLURM signals every process of a job step (``scancel --signal``, the time-limit signal): the
    workers keep grading, and the step the trainer finishes before it stops has its real rewards."""
    expected = pool.grade([(THINK + "\\boxed{3}", "3", "math")] * 2)
    for worker in pool.workers:
        for sig in EXIT_SIGNALS:
            os.kill(worker.proc.pid, sig)
    assert pool.grade([(THINK + "\\boxed{3}", "3", "math")] * 2) == expected
    assert expected[0].accuracy == 1.0 and pool.take_stats()["reward/timeouts"] == 0.0


def _grade_in_a_child() -> None:
    RewardPool(RewardConfig(timeout_s=TIMEOUT_S)).grade([(THINK + "\\boxed{3}", "3", "math")])


def test_a_process_that_used_a_pool_exits():
    """multiprocessing's exit handler stops daemon children with SIGTERM, which the workers ignore, and
    then waits for them: the pool's own finalizer must have killed them before (a training rank forked by
    torchrun or the tests' fork server would otherwise never exit)."""
    child = multiprocessing.get_context("fork").Process(target=_grade_in_a_child)
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    child.kill()


def test_reward_bounds_are_checked():
    for field, value in (("max_response_chars", 0), ("workers", 0), ("timeout_s", 0.0)):
        with pytest.raises(ValueError, match=f"reward.{field} must be"):
            RewardConfig(**{field: value})


def test_reward_time_and_timeouts_are_logged_each_step(tp2_run):
    for row in tp2_run:
        assert row["perf/reward_s"] > 0 and row["reward/timeouts"] == 0 and row["data/skipped_samples"] == 0
