"""The main job end to end through the real CLI under torchrun: layouts, resume, GRPO equivalence, errors.

The single-process runs (``single_process_runs``) share one launch (``one_process``); each test asserts on
its own run.
"""

import json
import math
import tarfile
from pathlib import Path

import pytest
from main_job import train, train_in_one_launch, untimed

LOSS_KEYS = (
    "papo/kl_prc",
    "papo/entropy",
    "papo/masked_entropy_sample",
    "actor/ref_kl",
    "actor/loss",
    "actor/grad_norm",
)


def close(a, b, keys, rtol):
    for k in keys:
        assert abs(a[k] - b[k]) <= rtol * max(abs(a[k]), abs(b[k]), 1e-6), (k, a[k], b[k])


BAD_INPUTS = [  # overrides, what the run must fail with
    (("trainer.stepz=3",), "unknown config key(s) ['trainer.stepz']"),
    (("parallel.tensor_model_parallel_size=2",), "world size 1 is not divisible by TP x PP = 2 x 1"),
    (("model.hf_path=/nonexistent/model",), "model.hf_path /nonexistent/model: no such directory"),
    (
        ("optimizer.lr=1e30", "trainer.max_bad_steps=1", "trainer.steps=3"),
        "consecutive steps with a non-finite",
    ),
]
OBJECTIVES = [
    ("algorithm.name=dapo", "algorithm.objective=vppo", "algorithm.global_token_mean=true"),
    ("algorithm.name=papo_g", "algorithm.objective=papo_vppo", "algorithm.masked_grad=true"),
]


def _letter_e(tmp_path: Path) -> str:
    """A reward the policy can reach: the share of the letter "e" in the response."""
    reward = tmp_path / "reward_e.py"
    reward.write_text(
        "def letter_e(response, answer, answer_type):\n"
        "    text = response.replace(' ', '')\n"
        "    return {'score': text.count('e') / max(len(text), 1), 'accuracy': 0.0, 'format': 0.0}\n"
    )
    return f"reward.function={reward}:letter_e"


def _coin_accuracy(tmp_path: Path) -> str:
    """A reward whose accuracy a random policy earns half the time: the parity of the response's text."""
    reward = tmp_path / "reward_parity.py"
    reward.write_text(
        "def parity(response, answer, answer_type):\n"
        "    hit = float(sum(map(ord, response)) % 2)\n"
        "    return {'score': hit, 'accuracy': hit, 'format': 0.0}\n"
    )
    return f"reward.function={reward}:parity"


def _empty_shard(tmp_path: Path) -> Path:
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    return empty


def single_process_runs(tmp_path: Path) -> dict[str, tuple[str, ...]]:
    """This module's runs on one process, by name (their files written into ``tmp_path``); the reference
    run first, as if alone."""
    coin = _coin_accuracy(tmp_path)
    return {
        "tp1": (),  # the reference of test_layouts_give_the_same_metrics
        **{f"bad_input{i}": overrides for i, (overrides, _) in enumerate(BAD_INPUTS)},
        "empty": (f"data.train_data={_empty_shard(tmp_path)}",),
        "learn": (
            _letter_e(tmp_path), "optimizer.lr=3e-3", "trainer.steps=10", "trainer.rollout_batch_size=4",
            "trainer.update_batch_size=4", "trainer.micro_batch_size=8", "rollout.n=8",
            "rollout.max_new_tokens=16", "rollout.embedded_batch_prompts=4",  # batched rollouts learn too
        ),
        "dry": ("algorithm.name=dapo", "algorithm.max_tries=2"),
        "extras": (
            coin, "algorithm.ref_kl_in_reward=true", "algorithm.ref_kl_controller=adaptive",
            "algorithm.ref_kl_horizon=10", "algorithm.use_sft_loss=true", "algorithm.gamma_anneal=linear",
            "algorithm.gamma_start=0.5", "algorithm.gamma_end=0.0", "trainer.steps=2",
        ),
        **{f"objective{i}": (coin, *overrides, "trainer.steps=1") for i, overrides in enumerate(OBJECTIVES)},
    }  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model):
    """``single_process_runs``, one after the other in one launch: name -> (metrics rows, finished run)."""
    tmp = tmp_path_factory.mktemp("one_process")
    return train_in_one_launch(tmp, tiny_model, single_process_runs(tmp))


@pytest.fixture(scope="module")
def reference_run(one_process):
    return one_process["tp1"][0]


@pytest.mark.parametrize("layout", ["tp2", "tp2xpp2"])
def test_layouts_give_the_same_metrics(request, tmp_path, tiny_model, reference_run, layout):
    if layout == "tp2":
        rows = request.getfixturevalue("tp2_run")
    else:
        pp2 = ("parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2")
        rows, _ = train(tmp_path, "run", tiny_model, 4, *pp2)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(abs(r[k]) < float("inf") for k in LOSS_KEYS)
        assert r["papo/kl_prc"] > 0 and r["papo/entropy"] > 0 and r["papo/masked_entropy_sample"] > 0
        # one mini-batch per step: its importance ratio is 1 on every response token (old log-probs of
        # the same tokens at the same positions, through the same pipeline)
        assert r["actor/ratio_dev_max"] < 1e-5, r["actor/ratio_dev_max"]
    close(rows[0], reference_run[0], LOSS_KEYS + ("response/length",), rtol=1e-4)  # same rollouts and weights
    assert reference_run[2]["papo/kl_prc"] != reference_run[0]["papo/kl_prc"]  # the policy moves


def test_data_parallel_run(tmp_path, tiny_model):
    rows, result = train(
        tmp_path,
        "dp",
        tiny_model,
        4,
        "parallel.tensor_model_parallel_size=2",
        "trainer.rollout_batch_size=4",
        "trainer.update_batch_size=4",
        "eval.interval=3",
        "eval.save_items=true",
    )
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["actor/grad_norm"] > 0 for r in rows)
    assert "saved checkpoint" in result.stdout and (tmp_path / "dp" / "ckpt" / "latest").read_text() == "3"
    # the evaluation's per-prompt records: both DP ranks' prompts, each once, in rank 0's file
    items = [
        json.loads(line) for line in (tmp_path / "dp" / "eval_items" / "step3.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["eval/prompts"] == 2 and len({i["uid"] for i in items}) == len(items) == 2
    assert rows[-1]["eval/accuracy"] == sum(i["accuracy"] for i in items) / 2


def test_stop_and_resume_continues_the_run(tp2_run, stopped_and_resumed):
    """``tp2_run``'s job stopped after step 2 (with both trackers on, conftest.py): a restart without
    ``--resume`` is refused, ``--resume`` continues, and step 3 is bitwise the uninterrupted run's."""
    _, resumed, first, again, result = stopped_and_resumed
    assert "saved checkpoint" in first.stdout
    assert again.returncode != 0 and "already holds a run (step 2)" in again.stdout + again.stderr
    assert "resumed from step 2" in result.stdout and [r["step"] for r in resumed] == [1, 2, 3]
    # weights, optimizer and scheduler state, data position, rollouts and masks are restored exactly
    # (and the trackers change nothing): step 3 is the uninterrupted run's (timings aside)
    assert untimed(resumed[2]) == untimed(tp2_run[2])


@pytest.mark.parametrize("index, message", [(i, message) for i, (_, message) in enumerate(BAD_INPUTS)])
def test_bad_input_fails_clearly(one_process, index, message):
    _, result = one_process[f"bad_input{index}"]
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def _override(result, key: str) -> str:
    """The value the run was given for ``key``."""
    return next(arg.split("=", 1)[1] for arg in result.args if arg.startswith(f"{key}="))


def test_empty_data_set_fails_before_the_model_is_built(one_process):
    _, result = one_process["empty"]
    empty, out = _override(result, "data.train_data"), Path(_override(result, "trainer.output_dir"))
    assert result.returncode != 0
    assert f"shard {empty} holds no samples" in result.stdout + result.stderr
    assert "Setting up optimizer" not in (out / "logs" / "rank0.log").read_text()


def test_papo_raises_a_reward_the_policy_can_reach(one_process):
    """The sign and scale of the whole update: rewarding the letter "e" makes responses use more of it."""
    rows, _ = one_process["learn"]
    rewards = [r["reward/mean"] for r in rows]
    assert sum(rewards[-3:]) / 3 > 1.5 * sum(rewards[:3]) / 3, rewards


def test_dapo_fills_the_batch_across_data_parallel_ranks_with_overlong_shaping(tmp_path, tiny_model):
    """DAPO at DP=2: every step updates on the whole rollout batch (kept groups pooled across ranks),
    reports tries and keep rate; the soft overlong punishment penalises responses near the limit."""
    rows, _ = train(
        tmp_path, "dapo", tiny_model, 2, _coin_accuracy(tmp_path), "algorithm.name=papo_d",
        "algorithm.max_tries=6", "algorithm.overlong_buffer=4", "trainer.steps=2",
        "trainer.rollout_batch_size=4", "trainer.update_batch_size=4",
    )  # fmt: skip
    for r in rows:
        assert r["rollout/used_groups"] == 4 and r["rollout/kept_groups"] >= 4, r
        assert 0 < r["rollout/keep_rate"] < 1 and r["rollout/tries"] >= 1
        assert 0 < r["rollout/informative_groups"] < 1  # score == accuracy here: the groups DAPO keeps
        assert r["actor/grad_norm"] > 0 and r["actor/update_skipped"] == 0
        assert 0 < r["reward/overlong_penalized"] <= 1 and r["reward/overlong_penalty"] < 0


def test_dapo_that_cannot_fill_the_batch_fails_clearly(one_process):
    """A random policy earns no accuracy on the synthetic task: every group is dropped."""
    _, result = one_process["dry"]
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "dynamic sampling: 2 tries" in out and "keep rate 0.0%" in out and "algorithm.max_tries" in out


def test_reference_extras_kl_in_reward_sft_loss_and_annealing(one_process):
    """ref_kl_in_reward (adaptive controller): no ref-KL loss term, the coefficient moves and is logged;
    use_sft_loss adds its term; the annealing factor of the first step is gamma_start."""
    first, second = one_process["extras"][0]
    # step 1: the policy is the reference (KL 0), so the controller lowers the coefficient by the most it
    # may: 1 - 0.2 * (2 prompts x 2 responses) / horizon 10
    assert "actor/ref_kl" not in first and first["actor/reward_kl"] == 0 and second["actor/reward_kl"] > 0
    assert first["actor/reward_kl_coef"] == 0.01
    assert second["actor/reward_kl_coef"] == pytest.approx(0.01 * (1 - 0.2 * 4 / 10))
    assert first["actor/sft_loss"] > 0
    assert first["papo/gamma"] == pytest.approx(0.02 * 0.5) and second["papo/gamma"] == pytest.approx(
        0.02 * 0.25
    )


@pytest.mark.parametrize("index, overrides", list(enumerate(OBJECTIVES)))
def test_registered_objectives_run_in_the_main_job(one_process, index, overrides):
    """``algorithm.objective=NAME`` trains end to end and logs the objective's own metrics."""
    (row,) = one_process[f"objective{index}"][0]
    assert 0 < row["vppo/kept_fraction"] < 1 and row["vppo/dependency"] >= 0
    assert row["vppo/alpha_min"] <= 1 <= row["vppo/alpha_max"]
    assert row["actor/grad_norm"] > 0 and math.isfinite(row["actor/loss"])
    if "algorithm.objective=papo_vppo" in overrides:
        assert row["papo/kl_prc"] > 0 and row["papo/masked_entropy"] > 0
