"""The planner's Qwen3-VL sizes (``--model qwen3_vl_2b|4b|8b|32b``) against transformers' own model."""

import pytest
import torch

from megatron_papo.planner.architectures import QWEN3_VL, ModelArch, get_model
from megatron_papo.planner.memory import Layout, Workload, estimate_memory


@pytest.mark.parametrize("name", list(QWEN3_VL))
def test_parameter_counts_match_transformers(name):
    from transformers import Qwen3VLForConditionalGeneration

    arch = get_model(name)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration._from_config(arch.to_hf_config())
    assert ModelArch.from_hf_config(name, arch.to_hf_config()) == arch
    assert arch.params(1) == sum(p.numel() for p in model.parameters())
    tied_copy = arch.language.embedding_params(1) if arch.language.tie_embeddings else 0
    assert sum(arch.stage_params(1, 4, s) for s in range(4)) == arch.params(1) + tied_copy
    estimate = estimate_memory(arch, Layout(4, 2, 1), Workload(recompute=True))
    assert estimate.peak > 0


@pytest.mark.parametrize("name", ["qwen3_vl_8b", "qwen3_vl_32b"])
def test_gpu_sbatch_layout_fits_80gb(name):
    """examples/slurm/qwen3_vl_{8b,32b}.sbatch: test_slurm's check of the Qwen2.5-VL scripts."""
    import test_slurm

    test_slurm.test_gpu_sbatch_layout_fits_80gb(name)
