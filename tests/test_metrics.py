"""Metrics files a person can plot, and the KL_prc-hacking rule."""

import io
import json

from megatron_papo.training.hacking import HackingDetector, HackingDetectorConfig
from megatron_papo.training.metrics import MetricsLogger


def test_jsonl_tensorboard_and_console(tmp_path):
    stream = io.StringIO()
    log = MetricsLogger(str(tmp_path), total_steps=4, stream=stream)
    log.log(1, {"reward/mean": 0.25, "papo/kl_prc": 0.01})
    log.log(2, {"reward/mean": 0.5, "papo/kl_prc": float("nan")})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["reward/mean"] == 0.5
    console = stream.getvalue()
    assert "step 2/4" in console and "eta" in console and "reward=0.5" in console
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("reward/mean")] == [0.25, 0.5]


def _step(kl, ent, clip):
    return {
        "papo/kl_prc": kl,
        "papo/entropy": ent,
        "papo/masked_entropy_sample": ent,
        "actor/pg_clipfrac_high": clip,
    }


def test_hacking_detector_fires_on_the_pattern_only():
    cfg = HackingDetectorConfig(warmup_steps=2, patience=2)
    calm = HackingDetector(cfg)
    # KL_prc rises alone (healthy PAPO learning): no flag
    assert not any(calm.update(_step(0.01 * 10**i, 1.0, 0.01)) for i in range(6))
    hacked = HackingDetector(cfg)
    flags = [
        hacked.update(m)
        for m in [_step(0.01, 1.0, 0.01), _step(0.01, 1.0, 0.01), _step(0.2, 1.5, 0.1), _step(0.5, 2.0, 0.2)]
    ]
    assert flags == [False, False, False, True]
    restored = HackingDetector(cfg)
    restored.load_state_dict(hacked.state_dict())
    assert restored.update(_step(0.6, 2.1, 0.2))


def test_plot_metrics_writes_a_png(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "papo"
    run.mkdir()
    rows = [{"step": 0, "eval/accuracy": 0.2}] + [
        {"step": s, "reward/mean": 0.1 * s, "papo/kl_prc": 0.01 * s, "papo/entropy": 1.0}
        for s in range(1, 13)
    ]  # 12 steps: the faint steps and their trailing mean; evaluations at steps 0 and 12
    rows[-1]["eval/accuracy"] = 0.4
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "plot.png"
    tool = __file__.replace("tests/test_metrics.py", "tools/plot_metrics.py")
    subprocess.run([sys.executable, tool, str(run / "metrics.jsonl"), "-o", str(out)], check=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    (run / "bad.jsonl").write_text("{not json\n")
    bad = subprocess.run([sys.executable, tool, str(run / "bad.jsonl")], capture_output=True, text=True)
    assert bad.returncode != 0 and "bad.jsonl:1: not a JSON line" in bad.stderr


def test_trailing_mean_of_the_plot():
    import sys

    sys.path.insert(0, __file__.replace("tests/test_metrics.py", "tools"))
    from plot_metrics import trailing_mean

    assert trailing_mean([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 5) == [3.0, 4.0]
    assert trailing_mean([1.0, 2.0], 5) == []
