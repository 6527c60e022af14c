"""Experiment trackers beside ``metrics.jsonl``: Weights & Biases and MLflow (the ``trackers`` extra).

Only the rank that logs metrics builds them (``build_trackers``), so only it writes. A tracker run's id
is kept in ``<output_dir>/trackers.json``; a run resumed from a checkpoint reads it back and appends to
the same tracker run, a fresh run starts new ones.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from megatron_papo.config_io import check_choices

RUN_IDS = "trackers.json"


def require_package(module: str) -> None:
    """Raise ``ValueError`` naming the extra to install when ``module`` cannot be imported (the config
    loader prefixes the section)."""
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"enabled=true needs the {module} package: pip install 'megatron-papo[trackers]'")


@dataclass
class WandbConfig:
    """The ``logging.wandb`` section: a Weights & Biases run with the step metrics, the run's config as
    its config and, every ``image_interval`` steps (0: never), the first ``image_prompts`` prompts'
    images as the policy sees them, original and masked. ``mode=offline`` writes under
    ``<output_dir>/wandb`` for a later ``wandb sync``. ``run_name`` defaults to the output directory's."""

    enabled: bool = False
    project: str = "megatron-papo"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["online", "offline"] = "online"
    image_interval: int = 0
    image_prompts: int = 1

    def __post_init__(self) -> None:
        check_choices(self, "logging.wandb")
        if self.image_interval < 0 or self.image_prompts < 1:
            raise ValueError(
                f"need image_interval >= 0 and image_prompts >= 1, got "
                f"{self.image_interval} and {self.image_prompts}"
            )
        if self.enabled:
            require_package("wandb")


@dataclass
class MlflowConfig:
    """The ``logging.mlflow`` section: an MLflow run with the step metrics and the run's config as params.

    ``tracking_uri``: a server (``http://...``), a database (``sqlite:///path/mlflow.db``) or a local file
    store (``file:/path``, no server; MLflow keeps it in maintenance mode and megatron-papo opts in for
    it); unset: ``$MLFLOW_TRACKING_URI``, else the file store ``<output_dir>/mlruns``. ``run_name``
    defaults to the output directory's."""

    enabled: bool = False
    tracking_uri: str | None = None
    experiment: str = "megatron-papo"
    run_name: str | None = None

    def __post_init__(self) -> None:
        if self.enabled:
            require_package("mlflow")


@dataclass
class InputImages:
    """One prompt's images as the policy sees them at a step (resized, [H, W, 3] uint8): the originals
    and their masked copies."""

    uid: str
    original: list[np.ndarray]
    masked: list[np.ndarray]


class Tracker:
    """One tracker run: ``log`` a step's metrics (with input images every ``image_interval`` steps, 0:
    never), ``close`` at the end; ``run_id`` is what a resumed run reopens."""

    key: str  # its entry in trackers.json
    run_id: str
    image_interval: int = 0

    def wants_images(self, step: int) -> bool:
        return bool(self.image_interval) and step % self.image_interval == 0

    def log(self, step: int, metrics: dict[str, float], images: list[InputImages]) -> None:
        """``images``: empty unless ``wants_images(step)``."""
        raise NotImplementedError

    def describe(self) -> str:
        """Where the run is, for the console."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class WandbTracker(Tracker):
    key = "wandb"

    def __init__(self, cfg: WandbConfig, config: dict[str, Any], out_dir: str, run_id: str | None) -> None:
        import wandb

        self._wandb, self.mode, self.image_interval = wandb, cfg.mode, cfg.image_interval
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.run_name or _dir_name(out_dir),
            tags=cfg.tags,
            config=config,
            mode=cfg.mode,
            dir=out_dir,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(silent=True),
        )
        self.run_id = self.run.id

    def log(self, step: int, metrics: dict[str, float], images: list[InputImages]) -> None:
        data: dict[str, Any] = dict(metrics)
        for kind in ("original", "masked"):
            pictures = [
                self._wandb.Image(image, caption=f"{prompt.uid} image {i}")
                for prompt in images
                for i, image in enumerate(getattr(prompt, kind))
            ]
            if pictures:
                data[f"inputs/{kind}"] = pictures
        self.run.log(data, step=step)

    def describe(self) -> str:
        where = self.run.url if self.mode == "online" else os.path.dirname(self.run.dir)
        return f"W&B {self.mode} run {self.run_id} ({where})"

    def close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    key = "mlflow"

    def __init__(self, cfg: MlflowConfig, config: dict[str, Any], out_dir: str, run_id: str | None) -> None:
        self.uri = (
            cfg.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or "file:" + os.path.join(os.path.abspath(out_dir), "mlruns")
        )
        if "://" not in self.uri or self.uri.startswith("file:"):  # a local file store: opt in to it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        self._metric = Metric
        self.client = MlflowClient(self.uri)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(cfg.experiment)
        )
        run = self.client.create_run(experiment_id, run_name=cfg.run_name or _dir_name(out_dir))
        self.run_id = run.info.run_id
        params = [Param(key, str(value)) for key, value in _flatten(config)]
        self.client.log_batch(self.run_id, params=params)

    def log(self, step: int, metrics: dict[str, float], images: list[InputImages]) -> None:
        now = int(time.time() * 1000)
        batch = [self._metric(key, value, now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def describe(self) -> str:
        return f"MLflow run {self.run_id} ({self.uri})"

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _dir_name(path: str) -> str:
    return os.path.basename(os.path.abspath(path))


def _flatten(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(a.b.c, value)`` for every leaf of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def build_trackers(
    wandb: WandbConfig, mlflow: MlflowConfig, config: dict[str, Any], out_dir: str, resumed: bool
) -> list[Tracker]:
    """The enabled trackers, each opening its run from ``<out_dir>/trackers.json`` when ``resumed`` and
    a new one otherwise; the file is rewritten with their ids (a resumed run keeps those of trackers it
    has turned off). ``config``: the run's config tree."""
    path = os.path.join(out_dir, RUN_IDS)
    ids: dict[str, str] = {}
    if resumed and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            ids = json.load(f)
    trackers: list[Tracker] = []
    if wandb.enabled:
        trackers.append(WandbTracker(wandb, config, out_dir, ids.get(WandbTracker.key)))
    if mlflow.enabled:
        trackers.append(MlflowTracker(mlflow, config, out_dir, ids.get(MlflowTracker.key)))
    if trackers:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(ids | {t.key: t.run_id for t in trackers}, f)
    return trackers
