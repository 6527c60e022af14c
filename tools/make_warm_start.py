"""Build the README main job's warm start: an early checkpoint of the synthetic-shapes study's SFT, in bf16.

    python tools/make_warm_start.py                 # -> examples/warm_start (about 6 MB; minutes on 2 cores)

Runs ``examples/synthetic_shapes/run_study.py --size cpu_prior_trap --sft-only sft.trainer.steps=N`` (the
study's data, its 2.8M-parameter random Qwen2.5-VL-shaped model and N = ``--sft-steps`` steps of
``megatron-papo sft``) in ``--work``, then writes the SFT's HF directory to ``--out`` with its weights cast
to bfloat16 (half the bytes; the trainer reads them back into float32 exactly). The study directory is
reused when it already holds the SFT.

Why an early checkpoint: after 40 SFT steps the policy closes half of its answers with ``\boxed{}`` and
gets ~19% of the test questions right, so a few minutes of RL show it learning (format, then accuracy);
the study's 100-step SFT (99% format) leaves RL only the slower gains that need dozens of steps to rise
above the step-to-step noise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

from megatron_papo.models.hf_directory import copy_non_weight_files
from megatron_papo.models.weights import SINGLE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(ROOT, "examples", "synthetic_shapes", "run_study.py")


def copy_as_bf16(src: str, out: str) -> None:
    """The HF directory ``src`` to ``out`` with floating-point weights in bfloat16; ``out`` appears whole
    (written beside it, then renamed) and an existing ``out`` is replaced only then."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".warm_start.", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp makes it private
    copy_non_weight_files(src, staging)
    tensors = load_file(os.path.join(src, SINGLE))
    save_file(
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()},
        os.path.join(staging, SINGLE),
        metadata={"format": "pt"},
    )
    os.chmod(os.path.join(staging, SINGLE), 0o644)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(staging, out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "examples", "warm_start"))
    parser.add_argument("--sft-steps", type=int, default=40, help="SFT steps of the warm start")
    parser.add_argument("--work", help="the study directory (default runs/warm_start_sft<N>)")
    args = parser.parse_args()
    work = args.work or os.path.join("runs", f"warm_start_sft{args.sft_steps}")
    cmd = [sys.executable, STUDY, "--size", "cpu_prior_trap", "--out", work, "--sft-only"]
    cmd.append(f"sft.trainer.steps={args.sft_steps}")
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    copy_as_bf16(os.path.join(work, "sft", "hf"), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
