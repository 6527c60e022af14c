"""The synthetic-shapes study end to end at ``--size smoke``: data, model, SFT, GRPO / PAPO-G / hacking
demo, evaluations, table and plots; a rerun skips every finished stage."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "synthetic_shapes", "run_study.py")


def _study(out) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(
        [sys.executable, SCRIPT, "--size", "smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_smoke_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    _study(out)
    results = json.loads((out / "results.json").read_text())
    assert set(results["evals"]) == {"sft", "grpo_s1", "papo_g_masked_s1"}
    for ev in results["evals"].values():
        for key in ("eval/accuracy", "eval/masked_accuracy", "eval/format"):
            assert 0.0 <= ev[key] <= 1.0
        assert ev["eval/prompts"] > 0
        subsets = [k.rsplit("/", 1)[1] for k in ev if k.startswith("eval/prompts/")]
        assert set(subsets) <= {"prior_consistent", "prior_violating", "other"} and subsets
        assert sum(ev[f"eval/prompts/{s}"] for s in subsets) == ev["eval/prompts"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_test"] == 4 and set(summary["sft"]) == {"acc", "acc_masked"}
    assert [(r["method"], r["seed"]) for r in summary["runs"]] == [("grpo", 1), ("papo_g_masked", 1)]
    keys = {"method", "seed", "acc", "acc_masked", "acc_prior_violating"}
    assert all(set(r) == keys for r in summary["runs"])
    masked_run = (out / "rl" / "papo_g_masked_s1" / "config.in.yaml").read_text()
    assert "masked_grad: true" in masked_run
    assert results["hacking"]["gamma"] == 1.0 and results["hacking"]["kl_prc_max"] >= 0.0
    for name in ("sft", "rl/grpo_s1", "rl/papo_g_masked_s1", "rl/hacking_papo_g"):
        assert results["timings_s"][name] > 0
    table = (out / "results.md").read_text()
    for row in ("| SFT (start) | 1 |", "| GRPO | 1 |", "| PAPO-G masked_grad | 1 |", "KL_prc-hacking demo"):
        assert row in table
    assert "| GRPO | " in table.split("Gain over the SFT start")[1]
    per_subset = table.split("Test accuracy per subset")[1]  # a subset absent from the 4 prompts shows "-"
    assert "| prior_consistent (orig. / masked) |" in per_subset and "| GRPO | " in per_subset
    for png in ("curves.png", "curves_s1.png", "accuracy.png", "hacking.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    papo = [
        json.loads(line)
        for line in (out / "rl" / "papo_g_masked_s1" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in papo] == [1, 2] and all("papo/kl_prc" in r for r in papo)
    # each run evaluates its final policy in its own launch, sampled as the SFT start's evaluation
    assert "eval/accuracy" not in papo[0]
    assert results["evals"]["papo_g_masked_s1"] == {
        k: v for k, v in papo[-1].items() if k.startswith("eval/")
    } | {"step": 2}
    items = [
        json.loads(line) for line in (out / "rl" / "papo_g_masked_s1" / "eval_items" / "step2.jsonl").open()
    ]
    assert len(items) == 4 and {"uid", "subset", "accuracy", "masked_accuracy"} <= set(items[0])
    sft_items = (out / "eval" / "sft" / "eval_items" / "step0.jsonl").read_text().splitlines()
    assert {json.loads(line)["uid"] for line in sft_items} == {i["uid"] for i in items}
    gains = table.split("Gain over the SFT start")[1].split("\n\n")[1]
    assert "| GRPO | " in gains and "| - | - |" not in gains  # the paired columns are filled
    sft_eval = (out / "eval" / "sft" / "config.in.yaml").read_text()
    assert "seed: 1234" in sft_eval and "max_new_tokens: 16" in sft_eval
    assert (out / "sft" / "hf" / "model.safetensors").exists()

    again = _study(out)
    assert again.count("skipped") == 5 and "start (" not in again
