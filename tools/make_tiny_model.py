"""Write a tiny random Qwen2.5-VL or Qwen3-VL (HF directory with tokenizer and image processor).

python tools/make_tiny_model.py OUT_DIR [--arch qwen2_5_vl|qwen3_vl] [--untied] [--layers N] [--hidden H]
"""

import argparse
import dataclasses

from megatron_papo.models.tiny import TinyQwen3VLSpec, TinyQwen25VLSpec, make_tiny_qwen3vl, make_tiny_qwen25vl

ARCHITECTURES = {  # --arch: the HF model type
    "qwen2_5_vl": (TinyQwen25VLSpec, make_tiny_qwen25vl),
    "qwen3_vl": (TinyQwen3VLSpec, make_tiny_qwen3vl),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=list(ARCHITECTURES), default="qwen2_5_vl", help="HF model type")
    parser.add_argument("--untied", action="store_true", help="separate output layer (as 7B+)")
    parser.add_argument("--layers", type=int, default=TinyQwen25VLSpec.num_layers)
    parser.add_argument("--hidden", type=int, default=TinyQwen25VLSpec.hidden_size)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    spec_class, make = ARCHITECTURES[args.arch]
    spec = dataclasses.replace(
        spec_class(),
        tie_word_embeddings=not args.untied,
        num_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        seed=args.seed,
    )
    print(make(args.out_dir, spec))


if __name__ == "__main__":
    main()
