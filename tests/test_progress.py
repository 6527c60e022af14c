"""The end-of-run learning summary (training/progress.py) against hand-computed statistics."""

import math
import random
import statistics

import pytest

from megatron_papo.training.progress import eval_change, progress_lines, window_change


def _rows(values, key="reward/mean"):
    return [{"step": s, key: v} for s, v in enumerate(values, 1)]


def test_window_change_matches_the_successive_difference_estimate():
    values = [0.1, 0.3, 0.2, 0.4, 0.5, 0.45, 0.6, 0.7]
    change = window_change(_rows(values), "reward/mean", "reward", window=3)
    diffs = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert change.first == pytest.approx(statistics.fmean(values[:3]))
    assert change.last == pytest.approx(statistics.fmean(values[-3:]))
    assert change.noise == pytest.approx(statistics.stdev(diffs) / math.sqrt(2) * math.sqrt(2 / 3))
    assert change.where == "steps 1-3 vs 6-8"
    assert window_change(_rows(values[:5]), "reward/mean", "reward", window=3) is None


def test_a_trend_stands_out_of_the_noise_and_flat_noise_does_not():
    rng = random.Random(0)
    flat = [0.4 + rng.gauss(0, 0.1) for _ in range(30)]
    rising = [0.4 + 0.01 * t + rng.gauss(0, 0.05) for t in range(30)]
    assert abs(window_change(_rows(flat), "reward/mean", "reward", 5).ratio) < 2
    assert window_change(_rows(rising), "reward/mean", "reward", 5).ratio > 3


def test_eval_change_is_binomial_and_the_summary_skips_step_zero_in_training_windows():
    rows = [{"step": 0, "eval/accuracy": 0.4, "eval/prompts": 100, "reward/mean": 99.0}]
    rows += _rows([0.5] * 10)
    rows[-1] |= {"eval/accuracy": 0.6, "eval/prompts": 100}
    change = eval_change(rows)
    assert (change.first, change.last) == (0.4, 0.6)
    assert change.noise == pytest.approx(math.sqrt(0.4 * 0.6 / 100 + 0.6 * 0.4 / 100))
    lines = progress_lines(rows, window=5)
    assert lines[0].startswith("learning") and len(lines) == 3  # reward (no accuracy key) and the eval
    assert "0.500 -> 0.500" in lines[1] and "step 0 vs 10, 100 prompts" in lines[2]
    assert progress_lines(_rows([0.5, 0.6])) == []
