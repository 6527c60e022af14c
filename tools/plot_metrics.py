"""Plot a run's ``metrics.jsonl``: reward, accuracy, KL_prc and both entropies over steps.

    python tools/plot_metrics.py runs/tiny_cpu/metrics.jsonl [more runs ...] -o runs/tiny_cpu/metrics.png

Several files overlay their curves (labelled by their run directory), e.g. GRPO against PAPO.
"""

from __future__ import annotations

import argparse
import os

from megatron_papo.training.metrics import read_metrics

PANELS = (
    ("reward/mean", "reward"),
    ("reward/accuracy", "accuracy"),
    ("papo/kl_prc", "KL_prc"),
    ("papo/entropy_sample", "entropy -mean(lp) (original image)"),
    ("papo/masked_entropy_sample", "entropy -mean(lp) (masked image)"),
    ("actor/pg_clipfrac_high", "high-side clip fraction"),
)


def plot(paths: list[str], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for i, path in enumerate(paths):
        rows = read_metrics(path)
        label = os.path.basename(os.path.dirname(os.path.abspath(path)))
        for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:  # a run's colour is the same in every panel, also where another run has no points
                ax.plot(*zip(*points, strict=True), marker=".", label=label, color=f"C{i % 10}")
            ax.set_title(title)
            ax.set_xlabel("step")
    axes.flat[0].legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl files")
    parser.add_argument("-o", "--output", help="PNG path (default: beside the first file)")
    args = parser.parse_args()
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.metrics[0])), "metrics.png")
    try:
        print(f"wrote {plot(args.metrics, out)}")
    except ValueError as e:  # a bad metrics file: its path and line, no traceback
        raise SystemExit(str(e)) from e


if __name__ == "__main__":
    main()
