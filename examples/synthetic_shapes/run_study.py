"""The synthetic-shapes study: SFT warm start, then GRPO vs PAPO from the same checkpoint, several seeds.

    python examples/synthetic_shapes/run_study.py --size cpu     # ~30 min on 2 CPU cores
    python examples/synthetic_shapes/run_study.py --size gpu     # ~200M parameters, one GPU
    python examples/synthetic_shapes/run_study.py --size smoke   # a couple of steps per stage (the test)

Stages, each skipped when its output exists (a rerun resumes; an interrupted run continues from its
checkpoint): data -> random Qwen2.5-VL-shaped model -> SFT -> RL runs (method x seed, and the
KL_prc-hacking demo: PAPO-G with a large gamma), each evaluating its final policy on the test split with
original and masked images at its last step -> ``megatron-papo eval`` of the SFT policy with the same
settings -> ``results.md`` (table), ``results.json`` and plots.
A size is a YAML file beside this script (``StudySize``); its ``sft`` / ``rl`` / ``hacking`` sections are
TrainConfig sections merged over ``base.yaml``, ``eval`` the TrainConfig ``eval`` section (generation as
in ``rl``). Each run's exact config is written into
its directory as ``config.in.yaml`` and launched with ``torchrun ... megatron_papo.cli``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import yaml
from safetensors import safe_open

from megatron_papo.config import TrainerConfig, load_train_config
from megatron_papo.config_io import load_config
from megatron_papo.data.config import SyntheticConfig
from megatron_papo.data.synthetic import SUBSET_TAGS, write_synthetic
from megatron_papo.evaluate import items_path
from megatron_papo.models.tiny import TinyQwen25VLSpec, make_tiny_qwen25vl
from megatron_papo.training.hacking import HackingDetector, HackingDetectorConfig
from megatron_papo.training.metrics import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
from plot_metrics import plot  # noqa: E402

EVAL_SEED = 1234  # the same sampling seed and masks for every evaluation
HACKING_RUN = "hacking_papo_g"
EVAL_COLUMNS = (
    "accuracy",
    "masked_accuracy",
    "accuracy_gap",
    "format",
    "accuracy/prior_consistent",
    "accuracy/prior_violating",
)
KINDS = ("accuracy", "masked_accuracy")
TRAIN_COLUMNS = ("reward/mean", "papo/kl_prc", "papo/entropy")
LABELS = {
    "sft": "SFT (start)",
    "grpo": "GRPO",
    "papo_g": "PAPO-G",
    "papo_g_masked": "PAPO-G masked_grad",
    "dapo": "DAPO",
    "papo_d": "PAPO-D",
}


@dataclass
class StudySize:
    """One ``--size``: the model, the task, the methods and seeds, and each stage's config sections."""

    model: TinyQwen25VLSpec
    data: SyntheticConfig
    methods: list[str]
    seeds: list[int]
    sft: dict[str, Any] = field(default_factory=dict)
    rl: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)  # the ``eval`` section (max_prompts, n)
    hacking: dict[str, Any] = field(default_factory=dict)  # merged over ``rl``
    # methods beyond the presets: name -> sections merged over ``rl`` (they set ``algorithm.name``)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    # a method run with other seeds than ``seeds`` (a variant kept to fewer seeds to fit the time budget)
    method_seeds: dict[str, list[int]] = field(default_factory=dict)
    nproc: int = 1  # processes per run (tensor parallel size times data parallel size)
    jobs: int = 1  # RL runs and evaluations at once (each with 1 / jobs of the CPU threads)

    def seeds_of(self, method: str) -> list[int]:
        return self.method_seeds.get(method, self.seeds)

    def method_runs(self, method: str) -> list[str]:
        return [f"{method}_s{s}" for s in self.seeds_of(method)]


def merge(base: dict[str, Any], *updates: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts merged left to right (later values win)."""
    out = copy.deepcopy(base)
    for update in updates:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


class Study:
    def __init__(self, size: StudySize, out: str, hacking_demo: bool, publish: str | None = None) -> None:
        self.size, self.out, self.hacking_demo = size, os.path.abspath(out), hacking_demo
        self.publish = publish  # a folder that receives summary.json and the plots (docs/results)
        with open(os.path.join(HERE, "base.yaml"), encoding="utf-8") as f:
            self.base = yaml.safe_load(f)
        os.makedirs(self.out, exist_ok=True)
        self.start = time.monotonic()
        self.timings_path = self.path("timings.json")
        self.timings: dict[str, float] = {}
        if os.path.exists(self.timings_path):
            with open(self.timings_path, encoding="utf-8") as f:
                self.timings = json.load(f)
        self.lock = threading.Lock()
        self.cpus_per_process = max(1, len(os.sched_getaffinity(0)) // size.nproc)
        self.parallel = 1  # processes running at once

    def log(self, text: str) -> None:
        elapsed = int(time.monotonic() - self.start)
        print(f"[study {elapsed // 60:3d}:{elapsed % 60:02d}] {text}", flush=True)

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    @property
    def runs(self) -> list[str]:
        runs = [r for m in self.size.methods for r in self.size.method_runs(m)]
        return runs + ([HACKING_RUN] if self.hacking_demo else [])

    # ---------------------------------------------------------------- stages

    def make_data(self) -> None:
        manifests = write_synthetic(self.size.data, self.path("data"))
        self.base = merge(
            self.base, {"data": {"train_data": manifests["train"], "test_data": manifests["test"]}}
        )

    def make_model(self) -> None:
        if not os.path.exists(self.path("model", "config.json")):
            make_tiny_qwen25vl(self.path("model"), self.size.model)
        with safe_open(self.path("model", "model.safetensors"), "pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        self.log(f"model: {params / 1e6:.1f}M parameters at {self.path('model')}")

    def run_config(self, run_dir: str, sections: dict[str, Any]) -> str:
        """Write ``run_dir/config.in.yaml`` (base + sections + the run's paths), checked; return its path."""
        cfg = merge(
            self.base,
            sections,
            {"trainer": {"output_dir": run_dir}, "checkpoint": {"dir": os.path.join(run_dir, "checkpoints")}},
        )
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "config.in.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        load_train_config(path)  # a bad size file fails here, not minutes into a run
        return path

    def launch(self, name: str, args: list[str], log_path: str) -> None:
        """``torchrun ... megatron_papo.cli ARGS``, output to ``log_path``; raises if it fails."""
        cmd = ["torchrun", "--standalone", f"--nproc_per_node={self.size.nproc}", "-m", "megatron_papo.cli"]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, self.cpus_per_process // self.parallel)))
        self.log(f"{name}: start ({' '.join(cmd[4:] + args)}; log {log_path})")
        start = time.monotonic()
        with open(log_path, "a", encoding="utf-8") as log:
            code = subprocess.call(cmd + args, stdout=log, stderr=subprocess.STDOUT, env=env)
        if code:
            raise RuntimeError(f"{name} failed (exit {code}); see {log_path}")
        with self.lock:  # runs finish in parallel threads
            self.timings[name] = time.monotonic() - start
            with open(self.timings_path, "w", encoding="utf-8") as f:
                json.dump(self.timings, f, indent=1)
        self.log(f"{name}: done in {self.timings[name]:.0f}s")

    def train(self, name: str, command: str, sections: dict[str, Any]) -> None:
        run_dir = self.path(name)
        done = os.path.join(run_dir, "DONE")
        if os.path.exists(done):
            self.log(f"{name}: done before, skipped")
            return
        config = self.run_config(run_dir, sections)
        # an interrupted run continues from its last checkpoint (a fresh one just starts)
        launch = [command, "--config", config, "checkpoint.resume=auto"]
        self.launch(name, launch, os.path.join(run_dir, "log.txt"))
        open(done, "w").close()

    def sft(self) -> None:
        self.train("sft", "sft", merge(self.size.sft, {"model": {"hf_path": self.path("model")}}))

    def rl_sections(self, run: str) -> dict[str, Any]:
        if run == HACKING_RUN:
            return merge(self.size.rl, self.size.hacking)
        method, seed = run.rsplit("_s", 1)
        sections = self.size.variants.get(method, {"algorithm": {"name": method}})
        return merge(self.size.rl, sections, {"trainer": {"seed": int(seed)}})

    def evaluate_sft(self) -> None:
        """``megatron-papo eval`` of the SFT policy (``eval/sft.json``)."""
        name = "sft"
        out = self.path("eval", f"{name}.json")
        if os.path.exists(out):
            self.log(f"eval {name}: done before, skipped")
            return
        sections = {
            "model": {"hf_path": self.path("sft", "hf")},
            "rollout": self.size.rl.get("rollout", {}),  # sampled as the RL runs' final evaluations
            "eval": merge(self.size.eval, {"seed": EVAL_SEED, "save_items": True}),
        }
        config = self.run_config(self.path("eval", name), sections)
        args = ["eval", "--config", config, "--output", out]
        self.launch(f"eval {name}", args, self.path("eval", name, "log.txt"))

    def rl(self, run: str) -> None:
        """Train ``run``; a method run evaluates its final policy inside the same launch (the size's
        ``eval`` settings at the last step, the shared ``EVAL_SEED``), saved as ``eval/RUN.json``."""
        sections = merge(self.rl_sections(run), {"model": {"hf_path": self.path("sft", "hf")}})
        if run == HACKING_RUN:
            self.train(f"rl/{run}", "train", sections)
            return
        steps = merge(self.base, sections).get("trainer", {}).get("steps", TrainerConfig.steps)
        final_eval = merge(self.size.eval, {"interval": steps, "seed": EVAL_SEED, "save_items": True})
        self.train(f"rl/{run}", "train", merge(sections, {"eval": final_eval}))
        out = self.path("eval", f"{run}.json")
        if not os.path.exists(out):
            last = read_metrics(self.path("rl", run, "metrics.jsonl"))[-1]
            results = {k: v for k, v in last.items() if k.startswith("eval/")} | {"step": last["step"]}
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1)

    def warm_start(self) -> str:
        """Data, the random model and its SFT warm start; returns the SFT's HF directory."""
        self.make_data()
        self.make_model()
        self.sft()
        return self.path("sft", "hf")

    def run(self) -> None:
        self.log(f"study in {self.out}: methods {self.size.methods}, seeds {self.size.seeds}")
        self.warm_start()
        self.parallel = self.size.jobs
        # longest first and the short SFT evaluation last, so no slot idles at the end: a size lists its
        # methods from the cheapest (GRPO) to the dearest (PAPO-D: an extra pass and dynamic-sampling tries)
        with ThreadPoolExecutor(self.size.jobs) as pool:
            futures = [pool.submit(self.rl, r) for r in reversed(self.runs)]
            futures.append(pool.submit(self.evaluate_sft))
            for future in futures:
                future.result()
        report = Report(self)
        report.write()
        self.log(f"results: {self.path('results.md')}")
        if self.publish:
            os.makedirs(self.publish, exist_ok=True)
            for name in sorted(os.listdir(self.out)):
                if name == "summary.json" or name.endswith(".png"):
                    shutil.copy(self.path(name), os.path.join(self.publish, name))
            self.log(f"summary.json and plots copied to {self.publish}")


# ---------------------------------------------------------------- results


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def replay(rule: HackingDetectorConfig, rows: list[dict[str, float]]) -> list[int]:
    """The steps ``rule`` flags in a run's metrics, as the trainer's detector would have."""
    detector = HackingDetector(rule)
    return [r["step"] for r in rows if detector.update(r)]


def _last(rows: list[dict[str, float]], key: str, window: int = 3) -> float | None:
    values = [r[key] for r in rows if key in r][-window:]
    return statistics.fmean(values) if values else None


class Report:
    """``results.md`` / ``results.json`` and plots from the runs' metrics and eval files."""

    def __init__(self, study: Study) -> None:
        self.study = study
        self.evals = {}
        for name in ["sft"] + study.runs:
            path = study.path("eval", f"{name}.json")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    self.evals[name] = json.load(f)
        self.metrics = {run: read_metrics(study.path("rl", run, "metrics.jsonl")) for run in study.runs}
        # each evaluated prompt's accuracy (eval.save_items), for the paired comparison with the SFT start
        self.items: dict[str, dict[str, float]] = {}
        for name, ev in self.evals.items():
            where = study.path("eval", "sft") if name == "sft" else study.path("rl", name)
            path = items_path(where, round(ev["step"]))
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    self.items[name] = {r["uid"]: r["accuracy"] for r in map(json.loads, f)}
        # the table's rows: the SFT start, then each method over its seeds
        self.groups = {"sft": ["sft"]} | {m: study.size.method_runs(m) for m in study.size.methods}

    def eval_stats(self, runs: list[str], key: str) -> tuple[float, float] | None:
        values = [self.evals[r][key] for r in runs if key in self.evals.get(r, {})]
        return _mean_std(values) if values else None

    def n_test(self) -> int:
        """Test prompts per evaluation (the SFT start's; every evaluation uses the same ones)."""
        return round(self.evals["sft"]["eval/prompts"])

    def gain(self, runs: list[str]) -> dict[str, float] | None:
        """A method's mean test accuracy over its seeds minus the SFT start's (``gain``), in units of
        the method mean's standard error (``z``: the bar is z >= 3), stricter, of the difference's
        (``z_diff``, the SFT start's own SE added in quadrature, as if the test items were not shared), and
        paired on the shared test prompts (``z_paired``, when every evaluation saved its items).

        Per run, the binomial SE over the N test prompts: sqrt(p (1 - p) / N). A method's mean over k
        seeds has SE sqrt(max(s^2, mean binomial variance) / k), s the seed spread (sample std), so
        neither three agreeing seeds nor a noisy test split understate it.

        Paired: per prompt i, d_i = (the method's accuracy on i, averaged over its seeds) - the SFT start's;
        SE = max(sd(d) / sqrt(N), s / sqrt(k)): the items' SE of the mean difference, and never below
        the seed spread's SE (training randomness that the per-item average would dilute).
        """
        accs = [self.evals[r]["eval/accuracy"] for r in runs if r in self.evals]
        if not accs or "sft" not in self.evals:
            return None
        n, sft = self.n_test(), self.evals["sft"]["eval/accuracy"]
        mean, spread = _mean_std(accs)
        binomial = statistics.fmean(p * (1 - p) / n for p in accs)
        se = math.sqrt(max(spread**2, binomial) / len(accs))
        se_diff = math.sqrt(se**2 + sft * (1 - sft) / n)
        out = {
            "gain": mean - sft,
            "se": se,
            "z": (mean - sft) / se if se else 0.0,
            "se_diff": se_diff,
            "z_diff": (mean - sft) / se_diff if se_diff else 0.0,
        }
        if "sft" in self.items and all(r in self.items for r in runs):
            base = self.items["sft"]
            d = [statistics.fmean(self.items[r][u] for r in runs) - acc for u, acc in base.items()]
            se_paired = max(statistics.stdev(d) / math.sqrt(len(d)), spread / math.sqrt(len(accs)))
            out |= {"se_paired": se_paired, "z_paired": statistics.fmean(d) / se_paired if se_paired else 0.0}
        return out

    def summary(self) -> dict[str, Any]:
        """``summary.json``: the SFT start and every run's test accuracies (fractions)."""
        runs = []
        size = self.study.size
        for method, seed in ((m, s) for m in size.methods for s in size.seeds_of(m)):
            ev = self.evals.get(f"{method}_s{seed}")
            if ev:
                runs.append(
                    {
                        "method": method,
                        "seed": seed,
                        "acc": ev["eval/accuracy"],
                        "acc_masked": ev["eval/masked_accuracy"],
                        "acc_prior_violating": ev.get("eval/accuracy/prior_violating"),
                    }
                )
        sft = self.evals["sft"]
        return {
            "n_test": self.n_test(),
            "sft": {"acc": sft["eval/accuracy"], "acc_masked": sft["eval/masked_accuracy"]},
            "runs": runs,
        }

    def gains_table(self) -> list[str]:
        lines = [
            f"Gain over the SFT start (test accuracy points, N = {self.n_test()} prompts; `Report.gain`: "
            "SE of the method's mean from the per-run binomial SE and the seed spread; SE of the difference "
            "adds the SFT start's binomial SE; paired: on the shared prompts, per-prompt differences; the "
            "bar is gain >= 3 SE):",
            "",
            "| method | mean acc. - SFT | SE (mean) | z | SE (difference) | z (difference) | SE (paired) | "
            "z (paired) | clears 3 SE |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, runs in self.groups.items():
            if method != "sft" and (g := self.gain(runs)):
                paired = f"{100 * g['se_paired']:.1f} | {g['z_paired']:+.2f}" if "z_paired" in g else "- | -"
                lines.append(
                    f"| {LABELS.get(method, method)} | {100 * g['gain']:+.1f} | {100 * g['se']:.1f} | "
                    f"{g['z']:+.2f} | {100 * g['se_diff']:.1f} | {g['z_diff']:+.2f} | {paired} | "
                    f"{'yes' if g['z'] >= 3 else 'no'} |"
                )
        return lines

    def train_stats(self, runs: list[str], key: str) -> tuple[float, float] | None:
        values = [v for r in runs if (v := _last(self.metrics.get(r, []), key)) is not None]
        return _mean_std(values) if values else None

    def hacking(self) -> dict[str, Any]:
        """The demo run's flags (logged by the trainer), and its detector rule replayed on every run's
        metrics (false positives on the healthy runs) beside the default rule's verdict."""
        rows = self.metrics.get(HACKING_RUN, [])
        kl = [r["papo/kl_prc"] for r in rows if "papo/kl_prc" in r]
        config = load_train_config(self.study.path("rl", HACKING_RUN, "config.in.yaml"))
        rule = config.logging.hacking_detector
        return {
            "gamma": config.algorithm.gamma,
            "detector": dataclasses.asdict(rule),
            "flagged_steps": [r["step"] for r in rows if r.get("papo/hacking_flag") == 1.0],
            "replayed": {run: replay(rule, m) for run, m in self.metrics.items()},
            "default_rule": {run: replay(HackingDetectorConfig(), m) for run, m in self.metrics.items()},
            "kl_prc_first": kl[0] if kl else None,
            "kl_prc_max": max(kl, default=None),
        }

    def table(self) -> list[str]:
        def percent(stats: tuple[float, float] | None) -> str:
            return "-" if stats is None else f"{100 * stats[0]:.1f} ± {100 * stats[1]:.1f}"

        def plain(stats: tuple[float, float] | None) -> str:
            return "-" if stats is None else f"{stats[0]:.4g} ± {stats[1]:.2g}"

        lines = [
            "| method | runs | test acc. (orig.) | test acc. (masked) | gap | format | prior-consistent | "
            "prior-violating | train reward (last 3) | KL_prc (last 3) | entropy (last 3) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method, runs in self.groups.items():
            evals = [percent(self.eval_stats(runs, f"eval/{k}")) for k in EVAL_COLUMNS]
            train = [plain(self.train_stats(runs, k)) for k in TRAIN_COLUMNS]
            cells = [LABELS.get(method, method), str(len(runs))] + evals + train
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    def subset_table(self) -> list[str]:
        """Accuracy per prior-trap subset (``eval/accuracy/<tag>``), original and masked images; empty
        when the task has no subsets."""
        sft = self.evals.get("sft", {})
        if not any(f"eval/prompts/{tag}" in sft for tag in SUBSET_TAGS):
            return []
        counts = ", ".join(f"{round(sft.get(f'eval/prompts/{tag}', 0))} {tag}" for tag in SUBSET_TAGS)
        lines = [
            "Test accuracy per subset, original / masked images (mean over seeds, percent; "
            f"{counts} prompts):",
            "",
            "| method | " + " | ".join(f"{tag} (orig. / masked)" for tag in SUBSET_TAGS) + " |",
            "|---" * (len(SUBSET_TAGS) + 1) + "|",
        ]
        for method, runs in self.groups.items():
            cells = []
            for tag in SUBSET_TAGS:
                pair = [self.eval_stats(runs, f"eval/{kind}/{tag}") for kind in KINDS]
                cells.append(" / ".join("-" if x is None else f"{100 * x[0]:.1f}" for x in pair))
            lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
        return lines

    def per_run(self) -> list[str]:
        lines = [
            "| run | test acc. (orig.) | test acc. (masked) | format | prior-violating | "
            "train reward (last 3) |",
            "|---|---|---|---|---|---|",
        ]
        for run in [r for runs in self.groups.values() for r in runs]:
            ev = self.evals.get(run, {})
            cells = [
                f"{100 * ev[f'eval/{k}']:.1f}" if f"eval/{k}" in ev else "-"
                for k in ("accuracy", "masked_accuracy", "format", "accuracy/prior_violating")
            ]
            reward = _last(self.metrics.get(run, []), "reward/mean")
            lines.append(
                f"| {run} | " + " | ".join(cells) + f" | {'-' if reward is None else f'{reward:.3f}'} |"
            )
        return lines

    def plot_accuracy(self, out: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.38
        bars = (("eval/accuracy", "original image"), ("eval/masked_accuracy", "masked image"))
        for offset, (key, label) in zip((-width / 2, width / 2), bars, strict=True):
            stats = [self.eval_stats(runs, key) or (0.0, 0.0) for runs in self.groups.values()]
            x = [i + offset for i in range(len(stats))]
            ax.bar(x, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=3, label=label)
        ax.set_xticks(range(len(self.groups)), [LABELS.get(n, n) for n in self.groups])
        ax.set_ylabel("test accuracy (mean ± std over seeds)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out, dpi=100)

    def write(self) -> None:
        study = self.study
        runs = [r for r in study.runs if r != HACKING_RUN]
        plot([study.path("rl", r, "metrics.jsonl") for r in runs], study.path("curves.png"))
        for seed in study.size.seeds:  # every method on the same prompts at each step
            seed_runs = [f"{m}_s{seed}" for m in study.size.methods if seed in study.size.seeds_of(m)]
            plot([study.path("rl", r, "metrics.jsonl") for r in seed_runs], study.path(f"curves_s{seed}.png"))
        self.plot_accuracy(study.path("accuracy.png"))
        lines = [
            f"# Synthetic-shapes study ({study.out})",
            "",
            f"Methods {study.size.methods}, seeds {study.size.seeds} "
            f"{study.size.method_seeds or ''}, from the same SFT checkpoint. "
            "Test accuracy: mean ± std over seeds (percent), avg@n sampling; masked: the same test prompts "
            "with PAPO's masked images. Train columns: mean of the last 3 steps' metrics.",
            "",
            *self.table(),
            "",
            *self.gains_table(),
            "",
            *self.subset_table(),
            "",
            *self.per_run(),
            "",
            "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in study.timings.items()) + ".",
            "",
            "![curves](curves.png)",
            "",
            *(f"![curves, seed {seed}](curves_s{seed}.png)" for seed in study.size.seeds),
            "",
            "![accuracy](accuracy.png)",
        ]
        results: dict[str, Any] = {
            "evals": self.evals,
            "timings_s": study.timings,
            "gains": {m: self.gain(runs) for m, runs in self.groups.items() if m != "sft"},
        }
        if study.hacking_demo:
            hacking = self.hacking()
            results["hacking"] = hacking
            hack_runs = [HACKING_RUN] + [r for r in runs if r.startswith("papo_g_")][:1]
            plot([study.path("rl", r, "metrics.jsonl") for r in hack_runs], study.path("hacking.png"))
            lines += [
                "",
                f"## KL_prc-hacking demo: PAPO-G with gamma = {hacking['gamma']}",
                "",
                f"HackingDetector {hacking['detector']}: flagged steps {hacking['flagged_steps'] or 'none'} "
                f"(logged by the trainer as papo/hacking_flag); KL_prc from {hacking['kl_prc_first']:.3g} to "
                f"max {hacking['kl_prc_max']:.3g}.",
                "",
                "| run | steps flagged by this rule (replayed) | by the default rule (replayed) |",
                "|---|---|---|",
                *(
                    f"| {run} | {hacking['replayed'][run] or '-'} | {hacking['default_rule'][run] or '-'} |"
                    for run in hacking["replayed"]
                ),
                "",
                "![hacking](hacking.png)",
            ]
        with open(study.path("results.md"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        with open(study.path("results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        with open(study.path("summary.json"), "w", encoding="utf-8") as f:
            json.dump(self.summary(), f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="cpu", help="a size file beside this script: smoke, cpu, gpu")
    parser.add_argument("--out", help="study directory (default: runs/synthetic_shapes/SIZE)")
    parser.add_argument("--no-hacking-demo", action="store_true", help="skip the large-gamma PAPO-G run")
    parser.add_argument("--publish", help="copy summary.json and the plots there too, e.g. docs/results")
    parser.add_argument("--sft-only", action="store_true", help="stop after the SFT warm start (OUT/sft/hf)")
    parser.add_argument("overrides", nargs="*", help="size overrides, e.g. seeds=[1,2,3] rl.trainer.steps=20")
    args = parser.parse_args()
    size = load_config(StudySize, os.path.join(HERE, f"{args.size}.yaml"), args.overrides)
    out = args.out or os.path.join("runs", "synthetic_shapes", args.size)
    start = time.monotonic()
    study = Study(size, out, hacking_demo=not args.no_hacking_demo, publish=args.publish)
    if args.sft_only:
        study.log(f"SFT warm start: {study.warm_start()}")
    else:
        study.run()
    print(f"study wall time: {time.monotonic() - start:.0f}s")


if __name__ == "__main__":
    main()
