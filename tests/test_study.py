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
    assert set(results["evals"]) == {"sft", "grpo_s1", "papo_g_s1"}
    for ev in results["evals"].values():
        for key in ("eval/accuracy", "eval/masked_accuracy", "eval/format"):
            assert 0.0 <= ev[key] <= 1.0
        assert ev["eval/prompts"] > 0
    assert results["hacking"]["gamma"] == 1.0 and results["hacking"]["kl_prc_max"] >= 0.0
    for name in ("sft", "rl/grpo_s1", "rl/papo_g_s1", "rl/hacking_papo_g"):
        assert results["timings_s"][name] > 0
    table = (out / "results.md").read_text()
    for row in ("| SFT (start) | 1 |", "| GRPO | 1 |", "| PAPO-G | 1 |", "KL_prc-hacking demo"):
        assert row in table
    for png in ("curves.png", "accuracy.png", "hacking.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    papo = [
        json.loads(line) for line in (out / "rl" / "papo_g_s1" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in papo] == [1, 2] and all("papo/kl_prc" in r for r in papo)
    assert (out / "sft" / "hf" / "model.safetensors").exists()

    again = _study(out)
    assert again.count("skipped") == 7 and "start (" not in again
