"""``bench/step.py`` runs at tiny size and prints what it promises; its model FLOPs agree with torch's count.

- One iteration of the tiny bench (one process, gloo) as a subprocess: a row per variant whose figures
  all parse as positive numbers, GRPO's ratio 1.
- ``forward_flops`` against ``torch.utils.flop_counter`` on a real forward of the tiny model (megatron's
  unfused attention, so the LM's attention is counted in full, i.e. twice the causal count the bench
  uses; the vision tower's segment attention is not seen by the counter).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch
from multiprocess import free_port, run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQUENCES, LENGTH = 2, 128
COLUMNS = "variant step_ms logprob_ms fwdbwd_ms optim_ms tokens/s mfu_step mfu_fwdbwd".split() + [
    "peak_MiB", "step_MiB", "vs_grpo",
]  # fmt: skip


def test_step_bench_tiny_prints_positive_figures():
    env = os.environ | {"MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "bench/step.py", "--size", "tiny", "--warmup", "0", "--iters", "1"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    columns = lines[header].split()
    assert columns == COLUMNS
    rows = {cells[0]: [float(c) for c in cells[1:]] for cells in map(str.split, lines[header + 1 :])}
    assert list(rows) == ["grpo", "papo", "papo+masked_grad"]
    for name, figures in rows.items():
        assert len(figures) == len(columns) - 1 and all(f > 0 for f in figures), (name, figures)
    assert rows["grpo"][-1] == 1.0


def _flops() -> tuple[int, int, int, int]:
    """FLOPs torch counts in a forward of the tiny model (one 56px image = one attention window per
    sequence) and in its vision tower, and the bench's counts of both."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.step import SIZES, forward_flops, synthetic_sequences
    from megatron_papo.models import ModelConfig, build_model
    from megatron_papo.planner.flops import vision_forward_flops
    from megatron_papo.training.sequences import micro_batch

    arch = SIZES["tiny"]
    config = arch.to_hf_config()
    with tempfile.TemporaryDirectory() as path:
        config.save_pretrained(path)
        model = build_model(ModelConfig(hf_path=path, attention="local"))
    seqs, grid = synthetic_sequences(config, SEQUENCES, LENGTH, 56, seed=0)
    batch = micro_batch(seqs, torch.arange(SEQUENCES))
    keys = ("input_ids", "position_ids", "attention_mask", "pixel_values", "image_grid_thw")
    with torch.no_grad(), FlopCounterMode(display=False) as total:
        model(**{k: getattr(batch, k) for k in keys})
    with torch.no_grad(), FlopCounterMode(display=False) as vision:
        model.vision(batch.pixel_values, batch.image_grid_thw)
    _, h, w = grid[0].tolist()
    counted_vision = SEQUENCES * vision_forward_flops(arch.vision, h, w)
    counted = forward_flops(arch, SEQUENCES, LENGTH, grid)
    return total.get_total_flops(), vision.get_total_flops(), counted, counted_vision


def test_forward_flops_match_torch_flop_counter():
    from bench.step import SIZES

    ((measured, measured_vision, counted, counted_vision),) = run_distributed(_flops, 1)
    lm, vis = SIZES["tiny"].language, SIZES["tiny"].vision
    patches = (56 // vis.patch_size) ** 2
    # the counter sees the LM's full s x s attention (the bench counts causal: half) ...
    causal = SEQUENCES * lm.num_layers * 2 * LENGTH**2 * lm.q_size
    measured_lm, counted_lm = measured - measured_vision, counted - counted_vision
    assert measured_lm == pytest.approx(counted_lm + causal, rel=0.01)  # norm weights / biases: < 1%
    # ... and not the vision tower's segment attention (QK^T and PV over one window of all patches)
    vision_attention = SEQUENCES * vis.depth * 4 * patches**2 * vis.hidden_size
    assert measured_vision == pytest.approx(counted_vision - vision_attention, rel=0.01)
