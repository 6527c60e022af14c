"""Convert Qwen2.5-VL weights between an HF directory and a megatron-core distributed checkpoint.

    python tools/convert_checkpoint.py hf-to-mcore --hf-dir Qwen2.5-VL-7B --out ckpt/qwen7b --tp 4 --pp 2
    python tools/convert_checkpoint.py mcore-to-hf --ckpt ckpt/qwen7b --out Qwen2.5-VL-7B-papo --tp 4 --pp 2
    python tools/convert_checkpoint.py mcore-to-hf --ckpt runs/papo/checkpoints/iter_0000100 \\
        --hf-dir Qwen2.5-VL-7B --out Qwen2.5-VL-7B-step100

The megatron checkpoint loads at any TP / PP layout (``dist_checkpointing``). The HF output holds
safetensors named as transformers writes them plus the source's config, generation config, tokenizer and
processor files, so transformers and vLLM load it unchanged. Runs ``tp * pp`` local processes, or the
ranks of ``torchrun --nproc-per-node tp*pp``. The output appears only when complete; an existing output
is never overwritten. See ``megatron_papo.models.conversion``.
"""

from __future__ import annotations

import argparse
import sys

from megatron_papo.models.config import DTYPES
from megatron_papo.models.conversion import hf_to_mcore, mcore_to_hf


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF directory -> megatron-core distributed checkpoint")
    to_mcore.add_argument("--hf-dir", required=True, help="HF Qwen2.5-VL directory")
    to_hf = sub.add_parser("mcore-to-hf", help="megatron-core distributed checkpoint -> HF directory")
    to_hf.add_argument("--ckpt", required=True, help="converted checkpoint or a trainer's iter_N directory")
    to_hf.add_argument("--hf-dir", help="config / tokenizer / processor source (default: <ckpt>/hf)")
    for p in (to_mcore, to_hf):
        p.add_argument("--out", required=True, help="output directory (must not exist)")
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the conversion")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the conversion")
        p.add_argument("--dtype", choices=list(DTYPES), help="weights dtype (default: the HF config's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.tp < 1 or args.pp < 1:
        raise SystemExit(f"--tp and --pp must be >= 1, got {args.tp} and {args.pp}")
    try:
        if args.direction == "hf-to-mcore":
            out = hf_to_mcore(args.hf_dir, args.out, args.tp, args.pp, args.dtype)
        else:
            out = mcore_to_hf(args.ckpt, args.out, args.tp, args.pp, args.hf_dir, args.dtype)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        raise SystemExit(f"convert_checkpoint: {e}") from e
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
