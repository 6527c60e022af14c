"""GRPO group advantages, DAPO's dynamic-sampling filter and overlong punishment, against plain Python."""

import random
import statistics

import pytest
import torch

from megatron_papo.papo.advantages import dynamic_sampling_keep, grpo_advantages, overlong_penalty


def _python_advantages(scores: list[float], n: int, scale: bool) -> list[float]:
    """A = (R - mean_group) / (std_group + 1e-6), unbiased std (statistics.stdev)."""
    out = []
    for start in range(0, len(scores), n):
        group = scores[start : start + n]
        mean = statistics.fmean(group)
        std = statistics.stdev(group) if n > 1 else 0.0
        out += [(r - mean) / (std + 1e-6) if scale and n > 1 else r - mean for r in group]
    return out


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_grpo_advantages_match_the_formula(n, scale):
    rng = random.Random(n)
    # the recipe's reward 0.9 * accuracy + 0.1 * format, plus one group of equal rewards
    scores = [0.9 * rng.randint(0, 1) + 0.1 * rng.randint(0, 1) for _ in range(6 * n)] + [0.5] * n
    ours = grpo_advantages(torch.tensor(scores), n, scale_by_std=scale)
    assert ours.dtype == torch.float32 and ours.shape == (7 * n,)
    torch.testing.assert_close(
        ours.double(),
        torch.tensor(_python_advantages(scores, n, scale), dtype=torch.float64),
        rtol=1e-6,
        atol=1e-6,
    )
    assert torch.equal(ours[-n:], torch.zeros(n))  # equal rewards: no signal


def test_dynamic_sampling_keeps_groups_strictly_inside_the_bounds():
    accuracy = torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0])
    assert dynamic_sampling_keep(accuracy, 4).tolist() == [False, True, False, True]
    assert dynamic_sampling_keep(accuracy, 4, low=0.3, high=0.7).tolist() == [False, False, False, False]
    assert dynamic_sampling_keep(accuracy, 4, low=0.2, high=0.8).tolist() == [False, True, False, True]
    assert dynamic_sampling_keep(accuracy, 4, low=0.0, high=1.0).tolist() == [False, True, False, True]
    assert dynamic_sampling_keep(accuracy, 2).tolist() == [
        False,
        False,
        True,
        False,
        False,
        False,
        False,
        True,
    ]


def test_overlong_penalty():
    torch.testing.assert_close(
        overlong_penalty(torch.tensor([10, 16, 18, 20]), 20, 4, 1.0), torch.tensor([0.0, 0.0, -0.5, -1.0])
    )
    torch.testing.assert_close(overlong_penalty(torch.tensor([19]), 20, 4, 0.5), torch.tensor([-0.375]))
    with pytest.raises(ValueError, match=r"overlong buffer must be in \(0, 20\]"):
        overlong_penalty(torch.tensor([1]), 20, 0, 1.0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"scores: expected \[groups \* 3\] values, got shape \(8,\)"):
        grpo_advantages(torch.zeros(8), 3)
    with pytest.raises(ValueError, match=r"scores: non-finite values in group\(s\) \[1\]"):
        grpo_advantages(torch.tensor([0.0, 1.0, float("nan"), 1.0]), 2)
    with pytest.raises(ValueError, match=r"accuracy: expected \[groups \* 4\]"):
        dynamic_sampling_keep(torch.zeros(2, 4), 4)
