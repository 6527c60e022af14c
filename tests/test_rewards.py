"""Rewards over real-looking model outputs: accuracy with math-verify (equivalent forms), choice letters
and exact answers; \\boxed{} extraction; the format reward; the registry with built-in and user rewards."""

import math

import pytest

from megatron_papo.rewards.accuracy import accuracy_reward, grade_answer
from megatron_papo.rewards.boxed import boxed_contents, last_boxed
from megatron_papo.rewards.config import RewardConfig
from megatron_papo.rewards.format import format_reward
from megatron_papo.rewards.registry import RewardOutput, build_reward_fn

THINK = "<think>The image shows two red circles and a blue square, so I count the red circles.</think>\n"

# (model output, reference answer, answer type, accuracy, format)
TABLE = [
    # right, in the recipe's format
    (THINK + "The answer is \\boxed{2}.", "2", "math", 1, 1),
    ("< think >reasoning</ think > \\boxed{2}", "2", "math", 1, 1),  # the reference strips tag spaces
    # wrong
    (THINK + "\\boxed{3}", "2", "math", 0, 1),
    (THINK + "\\boxed{-2}", "2", "math", 0, 1),
    # equivalent forms (math-verify)
    (THINK + "\\boxed{0.5}", "1/2", "math", 1, 1),
    (THINK + "\\boxed{\\frac{1}{2}}", "0.5", "math", 1, 1),
    (THINK + "\\boxed{\\dfrac12}", "\\frac{1}{2}", "math", 1, 1),
    (THINK + "\\boxed{50\\%}", "0.5", "math", 1, 1),  # math-verify accepts a percentage as its fraction
    (THINK + "\\boxed{50\\%}", "50", "math", 1, 1),  # ... and as the bare number
    (THINK + "\\boxed{x = 2}", "2", "math", 1, 1),
    (THINK + "\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", "math", 1, 1),
    (THINK + "\\boxed{90^\\circ}", "90", "math", 1, 1),
    (THINK + "\\boxed{(1, 2)}", "(1,2)", "math", 1, 1),
    (THINK + "\\boxed{(2, 1)}", "(1,2)", "math", 0, 1),  # an ordered pair
    (THINK + "\\boxed{0.49}", "1/2", "math", 0, 1),
    (THINK + "\\boxed{2^{2^{2^{2^{2}}}}}", "65536", "math", 0, 1),
    (THINK + "\\boxed{10}", "\\boxed{10}", "math", 1, 1),  # a boxed reference
    # words under "math": no symbolic reading (math-verify would take "red" as r*e*d = "der")
    (THINK + "\\boxed{der}", "red", "math", 0, 1),
    (THINK + "\\boxed{Red}", "red", "math", 1, 1),
    # multiple choice
    (THINK + "\\boxed{B}", "B", "choice", 1, 1),
    (THINK + "\\boxed{(B)}", "B", "choice", 1, 1),
    (THINK + "\\boxed{B. blue}", "B", "choice", 1, 1),
    (THINK + "\\boxed{\\text{b}}", "(B)", "choice", 1, 1),
    (THINK + "\\boxed{C}", "B", "choice", 0, 1),
    (THINK + "\\boxed{B and C}", "B", "choice", 0, 1),
    (THINK + "\\boxed{blue}", "B", "choice", 0, 1),
    # exact text (case, \text{}, a final period)
    (THINK + "\\boxed{\\text{Left}.}", "left", "exact", 1, 1),
    (THINK + "\\boxed{right}", "left", "exact", 0, 1),
    (THINK + "\\boxed{1/2}", "0.5", "exact", 0, 1),
    # missing box, unclosed box, empty box
    (THINK + "The answer is 2.", "2", "math", 0, 0),
    ("The answer is 2.", "2", "math", 0, 0),
    (THINK + "\\boxed{2", "2", "math", 0, 0),
    (THINK + "\\boxed{}", "2", "math", 0, 1),
    # multiple boxes: the last one is the answer
    (THINK + "First \\boxed{3}, no, it is \\boxed{2}", "2", "math", 1, 1),
    (THINK + "First \\boxed{2}, no, it is \\boxed{3}", "2", "math", 0, 1),
    # nested braces
    (THINK + "\\boxed{\\frac{1}{\\sqrt{4}}}", "1/2", "math", 1, 1),
    (THINK + "\\boxed{\\{1, 2\\}}", "\\{1,2\\}", "math", 1, 1),
    # no reasoning block / reasoning after the answer
    ("\\boxed{2}", "2", "math", 1, 0),
    ("\\boxed{2} <think>because</think>", "2", "math", 1, 0),
    # garbage
    ("}}{{ \\boxed{{{ \\boxed", "2", "math", 0, 0),
    ("\x00\ufffd" * 50, "2", "math", 0, 0),
    (THINK + "\\boxed{1e100000}", "2", "math", 0, 1),
    ("", "2", "math", 0, 0),
]


@pytest.mark.parametrize(
    "response, answer, answer_type, accuracy, fmt", TABLE, ids=map(str, range(len(TABLE)))
)
def test_reward_table(response, answer, answer_type, accuracy, fmt):
    reward = build_reward_fn(RewardConfig())
    out = reward(response, answer, answer_type)
    assert (out.accuracy, out.format) == (accuracy, fmt)
    assert out.score == pytest.approx(0.9 * accuracy + 0.1 * fmt)


def test_boxed_extraction():
    text = "\\boxed{a} then \\boxed{\\frac{1}{\\sqrt{x}}} and \\boxed{open"
    assert boxed_contents(text) == ["a", "\\frac{1}{\\sqrt{x}}"]
    assert last_boxed(text) == "\\frac{1}{\\sqrt{x}}" and last_boxed("no box") is None
    assert last_boxed("\\boxed{\\boxed{7}}") == "7"


def test_format_reward():
    assert format_reward("<think>a\nb</think>\nso \\boxed{1}.") == 1.0
    assert format_reward("<think></think>\\boxed{x}") == 1.0
    assert format_reward("<think>a \\boxed{1}</think>") == 0.0  # the answer inside the reasoning only
    assert format_reward("<think>a</think> 1") == 0.0
    assert format_reward("think: a </think> \\boxed{1}") == 0.0


def test_accuracy_reward_refuses_an_unknown_answer_type():
    with pytest.raises(ValueError, match="unknown answer_type 'free'"):
        grade_answer("2", "2", "free")
    assert accuracy_reward("\\boxed{2}", "2") == 1.0  # math by default


def test_registry_builtins_and_weights():
    response = THINK + "\\boxed{3}"
    assert build_reward_fn(RewardConfig())(response, "3", "math") == RewardOutput(1.0, 1.0, 1.0)
    half = build_reward_fn(RewardConfig(format_weight=0.5))("\\boxed{3}", "3", "math")
    assert half == RewardOutput(0.5, 1.0, 0.0)
    assert build_reward_fn(RewardConfig("accuracy_only"))("\\boxed{3}", "3", "math") == RewardOutput(
        1.0, 1.0, 0.0
    )


USER_REWARD = """
from megatron_papo.rewards.registry import RewardOutput


def length_reward(response, answer, answer_type):
    return {"score": len(response) / 10, "accuracy": float(answer in response), "format": 0}


def typed_reward(response, answer, answer_type):
    return RewardOutput(1.0, 1.0, 1.0 if answer_type == "exact" else 0.0)


def broken(response, answer, answer_type):
    return 0.5


def nan_reward(response, answer, answer_type):
    return RewardOutput(float("nan"), 0.0, 0.0)


NOT_CALLABLE = 3
"""


def test_registry_user_functions_by_file_and_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_REWARD)
    by_file = build_reward_fn(RewardConfig(f"{tmp_path}/my_rewards.py:length_reward"))
    assert by_file("the answer 42", "42", "math") == RewardOutput(1.3, 1.0, 0.0)
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = build_reward_fn(RewardConfig("my_rewards:typed_reward"))
    assert by_module("x", "y", "exact") == RewardOutput(1.0, 1.0, 1.0)

    with pytest.raises(TypeError, match=r"reward function my_rewards:broken returned 0.5; it must return"):
        build_reward_fn(RewardConfig("my_rewards:broken"))("x", "y", "math")
    with pytest.raises(ValueError, match="returned a non-finite value"):
        build_reward_fn(RewardConfig("my_rewards:nan_reward"))("x", "y", "math")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("papo_defualt", r"neither a registered reward \['accuracy_only', 'papo_default'\] nor of the form"),
        ("missing_file.py:f", "cannot import missing_file.py .*does not exist"),
        ("no_such_module_xyz:f", "cannot import no_such_module_xyz .*ModuleNotFoundError"),
        ("my_rewards:NOT_CALLABLE", "my_rewards has no callable 'NOT_CALLABLE'"),
        ("my_rewards:absent", "my_rewards has no callable 'absent'"),
        ("{tmp}/bad_syntax.py:f", "cannot import .*bad_syntax.py .*SyntaxError"),
        ("my_rewards:", "neither a registered reward"),
    ],
)
def test_registry_bad_specs_are_explained(tmp_path, monkeypatch, spec, message):
    (tmp_path / "my_rewards.py").write_text(USER_REWARD)
    (tmp_path / "bad_syntax.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        build_reward_fn(RewardConfig(spec.format(tmp=tmp_path)))


def test_reward_config_is_checked():
    with pytest.raises(ValueError, match="reward.function must name"):
        RewardConfig(" ")
    with pytest.raises(ValueError, match=r"format_weight must be in \[0, 1\]"):
        RewardConfig(format_weight=1.5)
    assert math.isclose(RewardConfig().format_weight, 0.1)
