"""Write the vision-dependent synthetic task (shapes, colors, positions, digits) as train / test shards.

    python tools/make_synthetic.py data/synthetic --num-train 2000 --num-test 200 --difficulty 2 --seed 0

Output: ``OUT/train/manifest.json`` and ``OUT/test/manifest.json`` (point ``data.train_data`` /
``data.test_data`` at them) plus ``OUT/synthetic_config.json``. The same arguments give the same shards
byte for byte; test scenes never occur in train. ``OUT`` appears only when complete; an existing ``OUT``
made with the same arguments is reused, one made with others is refused. See
``megatron_papo.data.synthetic``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from megatron_papo.data.config import QUESTION_TYPES, SyntheticConfig
from megatron_papo.data.records import DataError
from megatron_papo.data.synthetic import write_synthetic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="output folder (must not exist, or hold the same set)")
    parser.add_argument("--num-train", type=int, default=defaults.num_train)
    parser.add_argument("--num-test", type=int, default=defaults.num_test)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--difficulty", type=int, default=defaults.difficulty, help="1 easy .. 3 hard (more, smaller objects)"
    )
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="image side in pixels")
    parser.add_argument(
        "--question-types",
        nargs="+",
        default=list(defaults.question_types),
        help=f"from {list(QUESTION_TYPES)} (digit_sum needs --difficulty 3)",
    )
    parser.add_argument("--samples-per-shard", type=int, default=defaults.samples_per_shard)
    parser.add_argument(
        "--count-prior-answer", type=int, default=None, help="prior trap: the train split's dominant count"
    )
    parser.add_argument(
        "--count-prior-fraction",
        type=float,
        default=defaults.count_prior_fraction,
        help="share of train count questions with --count-prior-answer",
    )
    parser.add_argument(
        "--count-prior-in-test",
        action="store_true",
        help="the test split follows the same prior (an i.i.d. test split)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, str]:
    """Write (or reuse) the set; return {split: manifest path}."""
    args = parse_args(argv)  # its destinations are SyntheticConfig's field names
    try:
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticConfig)}
        cfg = SyntheticConfig(**{**values, "question_types": tuple(args.question_types)})
        manifests = write_synthetic(cfg, args.out_dir)
    except (DataError, ValueError) as e:
        raise SystemExit(f"make_synthetic: {e}") from e
    for split, path in manifests.items():
        print(f"{split}: {path}")
    return manifests


if __name__ == "__main__":
    main(sys.argv[1:])
