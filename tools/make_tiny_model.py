"""Write a tiny random Qwen2.5-VL (HF directory with tokenizer and image processor).

python tools/make_tiny_model.py OUT_DIR [--untied] [--layers N] [--hidden H]
"""

import argparse
import dataclasses

from megatron_papo.models.tiny import TinyQwen25VLSpec, make_tiny_qwen25vl


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir")
    parser.add_argument("--untied", action="store_true", help="separate output layer (as 7B+)")
    parser.add_argument("--layers", type=int, default=TinyQwen25VLSpec.num_layers)
    parser.add_argument("--hidden", type=int, default=TinyQwen25VLSpec.hidden_size)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    spec = dataclasses.replace(
        TinyQwen25VLSpec(),
        tie_word_embeddings=not args.untied,
        num_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        seed=args.seed,
    )
    print(make_tiny_qwen25vl(args.out_dir, spec))


if __name__ == "__main__":
    main()
