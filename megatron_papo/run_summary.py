"""A run's first console lines: what runs where (model, layout, data, rollout backend, output paths)."""

from __future__ import annotations

import os

from megatron_papo.config import TrainConfig
from megatron_papo.console import debug_mode, run_log_path
from megatron_papo.models.config import MODEL_TYPES
from megatron_papo.parallel import LaunchEnv


def _data(cfg: TrainConfig, out_dir: str) -> str:
    data = cfg.data
    if data.train_data is None:
        synthetic = data.synthetic
        source = (
            f"synthetic task, {synthetic.num_train} train / {synthetic.num_test} test prompts in "
            f"{os.path.join(out_dir, 'synthetic')}"
        )
    else:
        source = f"train {data.train_data}" + (f", test {data.test_data}" if data.test_data else "")
    masking = cfg.masking
    return f"{source}; masked images: {masking.strategy}, ratio {masking.ratio}"


def _rollout(cfg: TrainConfig) -> str:
    rollout = cfg.rollout
    if rollout.backend == "vllm":
        engine = f"vLLM servers {', '.join(rollout.vllm_urls)} (weight sync: {rollout.vllm_weight_sync})"
    else:
        engine = "embedded (transformers generate in each process)"
    sampling = f"n {rollout.n}, up to {rollout.max_new_tokens} new tokens, temperature {rollout.temperature}"
    if rollout.max_staleness:
        sampling += f"; generated up to {rollout.max_staleness} step(s) ahead on a background thread"
    return f"{engine}; {sampling}"


def describe_run(
    cfg: TrainConfig, headline: str, hf_config, launch: LaunchEnv, backend: str, rollout: bool
) -> list[str]:
    """The lines that open a run's console output. ``headline``: the job (algorithm, steps, batch);
    ``hf_config``: the model's HF config; ``launch``: how the processes were started; ``backend``: where
    they run and how they talk (``cpu, gloo``); ``rollout``: whether the run generates responses."""
    text, vision = hf_config.get_text_config(), hf_config.vision_config
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    dp = cfg.parallel.data_parallel_size(launch.world_size)
    out = os.path.abspath(cfg.trainer.output_dir)
    logs = os.path.dirname(run_log_path(out, 0))
    logs = "on the console" if debug_mode() else f"{logs}/ (MEGATRON_PAPO_DEBUG=1: on the console)"
    lines = [
        f"megatron-papo: {headline}",
        f"  model    {cfg.model.hf_path}: {MODEL_TYPES[hf_config.model_type]} (language "
        f"{text.num_hidden_layers} layers, hidden {text.hidden_size}; vision {vision.depth} layers, hidden "
        f"{vision.hidden_size}), {cfg.model.dtype}",
        f"  layout   {launch.world_size} process{'es' if launch.world_size > 1 else ''} "
        f"({launch.launcher}; {backend}): TP {tp} x PP {pp} x DP {dp}",
        f"  data     {_data(cfg, out)}",
    ]
    if rollout:
        lines.append(f"  rollout  {_rollout(cfg)}")
    lines.append(
        f"  output   {out}: metrics.jsonl"
        + (", tensorboard/" if cfg.logging.tensorboard else "")
        + f"; checkpoints {os.path.abspath(cfg.checkpoint.dir)}; library logs {logs}"
    )
    return lines
