"""Plot a run's ``metrics.jsonl``: reward, accuracy (and test accuracy), KL_prc and both entropies over steps.

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


SMOOTH = 5  # steps of the trailing mean drawn over each curve (a step: a mean over a few dozen samples)


def trailing_mean(values: list[float], window: int = SMOOTH) -> list[float]:
    """The mean of each ``window`` consecutive values, ending at each position from ``window - 1`` on."""
    return [sum(values[i - window + 1 : i + 1]) / window for i in range(window - 1, len(values))]


def plot(paths: list[str], out: str) -> str:
    """Each run's curves (its steps faint, their trailing ``SMOOTH``-step mean bold) and, in the accuracy
    panel, its test accuracy at each evaluation (squares, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for i, path in enumerate(paths):
        rows = read_metrics(path)
        label = os.path.basename(os.path.dirname(os.path.abspath(path)))
        color = f"C{i % 10}"  # a run's colour is the same in every panel, also where another run has none
        for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
            steps = [r["step"] for r in rows if key in r and r["step"] > 0]
            values = [r[key] for r in rows if key in r and r["step"] > 0]
            if len(values) >= 2 * SMOOTH:
                ax.plot(steps, values, marker=".", alpha=0.3, color=color)
                ax.plot(steps[SMOOTH - 1 :], trailing_mean(values), color=color, linewidth=2, label=label)
            elif values:
                ax.plot(steps, values, marker=".", label=label, color=color)
            ax.set_title(title)
            ax.set_xlabel("step")
        evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
        if evals:
            axes.flat[1].plot(*zip(*evals, strict=True), "s--", color=color, label=f"{label} (test)")
    axes.flat[1].legend()
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
