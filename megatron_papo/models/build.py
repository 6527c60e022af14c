"""``build_model``: this rank's pipeline stage of the policy named by the HF config's ``model_type``."""

from __future__ import annotations

from megatron.core import parallel_state as ps

from megatron_papo.models.config import ModelConfig, load_hf_config
from megatron_papo.models.qwen3vl import Qwen3VLModel
from megatron_papo.models.qwen25vl import Qwen25VLModel

MODELS = {"qwen2_5_vl": Qwen25VLModel, "qwen3_vl": Qwen3VLModel}  # by the HF config's model_type


def build_model(
    cfg: ModelConfig, pre_process: bool | None = None, post_process: bool | None = None
) -> Qwen25VLModel:
    """This rank's stage of the policy in ``cfg.hf_path`` (random weights: load them with
    ``load_hf_weights``). ``pre_process`` / ``post_process`` default to this rank's place in the pipeline."""
    hf_config = load_hf_config(cfg.hf_path)
    pre = ps.is_pipeline_first_stage() if pre_process is None else pre_process
    post = ps.is_pipeline_last_stage() if post_process is None else post_process
    return MODELS[hf_config.model_type](cfg, hf_config, pre, post)
