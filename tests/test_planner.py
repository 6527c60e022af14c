"""The memory planner against transformers' Qwen2.5-VL and against a real megatron-core run on CPU.

- Parameter counts of the four released sizes equal transformers' own model (built on the meta device)
  and the published sizes.
- At TP=2 x PP=2, the project's Qwen2.5-VL (``megatron_papo.models``, megatron-core's local layers,
  fp32) is built with megatron DDP and the megatron-core optimizer; per stage, the planner's weights,
  gradient buffer and Adam state equal the bytes of the real tensors (up to DDP's bucket padding), and
  its activation estimate for one micro-batch is within 1% of the bytes autograd actually saved for
  backward (``saved_tensors_hooks``, each storage counted once, parameters excluded) in a forward of
  the vision tower, the decoder and the PAPO loss's log-prob/entropy op.
"""

from __future__ import annotations

import argparse
import io
from contextlib import redirect_stdout

import pytest
import torch
from multiprocess import run_distributed

from megatron_papo.planner import cli
from megatron_papo.planner.architectures import QWEN2_5_VL, ModelArch, get_model
from megatron_papo.planner.memory import GIB, Layout, Workload, estimate_memory, plan

PUBLISHED_BILLIONS = {
    "qwen2_5_vl_3b": 3.75,
    "qwen2_5_vl_7b": 8.29,
    "qwen2_5_vl_32b": 33.5,
    "qwen2_5_vl_72b": 73.4,
}
SIDE, MBS, SEQ = 8, 2, 64  # an 8x8-patch image (16 LM tokens) per sequence


@pytest.mark.parametrize("name", list(QWEN2_5_VL))
def test_parameter_counts_match_transformers(name):
    from transformers import Qwen2_5_VLForConditionalGeneration

    arch = get_model(name)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(arch.to_hf_config())
    assert ModelArch.from_hf_config(name, arch.to_hf_config()) == arch
    assert arch.params(1) == sum(p.numel() for p in model.parameters())
    assert arch.params(1) / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.005)  # model cards round
    # the pipeline stages hold the model once, plus the last stage's copy of a tied embedding
    tied_copy = arch.language.embedding_params(1) if arch.language.tie_embeddings else 0
    assert sum(arch.stage_params(1, 4, s) for s in range(4)) == arch.params(1) + tied_copy


def _tiny_config_dir(path: str) -> str:
    from transformers import Qwen2_5_VLConfig

    Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=128,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=500,
        video_token_id=501,
        vision_start_token_id=502,
        vision_end_token_id=503,
        tie_word_embeddings=True,
    ).save_pretrained(path)
    return path


def _measure(hf_dir: str) -> dict:
    """On one rank: parameters, DDP grad buffer and Adam state bytes, and the bytes one micro-batch's
    forward (+ the loss op) saves for backward."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_papo.models import build_model, mrope_position_ids
    from megatron_papo.models.config import ModelConfig, load_hf_config
    from megatron_papo.ops.vocab_parallel import log_probs_and_entropy
    from megatron_papo.training.optimizer import OptimizerConfig, build_optimizer

    hf = load_hf_config(hf_dir)
    model = build_model(ModelConfig(hf_path=hf_dir, attention="local", dtype="float32"))
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    grid = torch.tensor([[1, SIDE, SIDE]] * MBS)
    ids = torch.randint(0, 400, (MBS, SEQ))
    ids[:, 2 : 2 + SIDE * SIDE // 4] = hf.image_token_id
    positions = mrope_position_ids(ids, grid, torch.ones_like(ids), hf)
    pixels = torch.randn(MBS * SIDE * SIDE, 1176)
    if not first:
        model.set_input_tensor(torch.randn(SEQ, MBS, 128, requires_grad=True))

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, positions, None, pixels if first else None, grid if first else None)
        if last:
            log_probs_and_entropy(out.reshape(MBS * SEQ, -1), ids.reshape(-1))
    activations = sum(saved.values())

    local_params = sum(p.numel() for p in model.parameters())
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    optimizer, _ = build_optimizer(OptimizerConfig(lr=1e-3, use_distributed_optimizer=False), [ddp], 1)
    optimizer.step()  # zero gradients: creates Adam's state for every parameter
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers)
    states = [t for opt in getattr(optimizer, "chained_optimizers", [optimizer]) for t in _state(opt)]
    return {
        "stage": ps.get_pipeline_model_parallel_rank(),
        "params": local_params,
        "grads": grads,
        "optimizer": sum(t.numel() * t.element_size() for t in states),
        "activations": activations,
    }


def _state(optimizer) -> list[torch.Tensor]:
    return [
        v for s in optimizer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()
    ]


def test_estimate_matches_measured_tp2_pp2(tmp_path):
    hf_dir = _tiny_config_dir(str(tmp_path / "tiny"))
    arch = get_model(hf_dir)
    layout = Layout(tp=2, pp=2, dp=1)
    work = Workload(
        micro_batch_size=MBS,
        seq_length=SEQ,
        images=1,
        image_pixels=SIDE * SIDE * 14 * 14,
        num_microbatches=1,
        kernels="local",
        dtype="float32",
        distributed_optimizer=False,
        overhead_gib=0,
    )
    estimate = estimate_memory(arch, layout, work)
    for measured in run_distributed(_measure, 4, hf_dir, tp=2, pp=2):
        stage = estimate.stages[measured["stage"]]
        assert measured["params"] == stage.params
        assert stage.weights == 4 * measured["params"]
        # DDP pads its buffer to whole buckets: the planner's fp32 main grads are the unpadded bytes
        assert stage.grads <= measured["grads"] <= stage.grads * 1.01
        assert measured["optimizer"] == stage.optimizer  # fp32 weights: exp_avg + exp_avg_sq
        assert measured["activations"] == pytest.approx(stage.activations, rel=0.01), measured


def test_plan_and_estimates_behave():
    arch = get_model("qwen2_5_vl_7b")
    work = Workload(micro_batch_size=1, recompute=True)
    rows = plan(arch, 8, 80, work)
    fits = [e.layout for e, ok in rows if ok]
    assert Layout(4, 1, 2) in fits and all(e.peak <= 80 * GIB for e, ok in rows if ok)
    assert all(e.peak > 80 * GIB for e, ok in rows if not ok)
    assert all(lay.tp * lay.pp * lay.dp == 8 for lay in (e.layout for e, _ in rows))
    base = estimate_memory(arch, Layout(4, 1, 2), work)
    # the distributed optimizer shards the 12 bytes/param of fp32 master + Adam over DP
    unsharded = estimate_memory(
        arch, Layout(4, 1, 2), Workload(micro_batch_size=1, recompute=True, distributed_optimizer=False)
    )
    assert unsharded.stages[0].optimizer == 2 * base.stages[0].optimizer == 12 * base.stages[0].params
    # masked_grad doubles what a micro-batch keeps; recompute shrinks it; the reference model adds weights
    doubled = estimate_memory(arch, Layout(4, 1, 2), Workload(micro_batch_size=2, recompute=True))
    masked = estimate_memory(
        arch, Layout(4, 1, 2), Workload(micro_batch_size=1, recompute=True, masked_grad=True)
    )
    assert masked.stages[0].activations == doubled.stages[0].activations
    full = estimate_memory(arch, Layout(4, 1, 2), Workload(micro_batch_size=1))
    assert full.stages[0].activations > 2 * base.stages[0].activations
    ref = estimate_memory(arch, Layout(4, 1, 2), Workload(micro_batch_size=1, recompute=True, ref_model=True))
    assert ref.peak - base.peak == base.stages[0].weights
    # 1F1B: the first of 4 stages keeps 4 micro-batches in flight, the last one
    pp4 = estimate_memory(arch, Layout(2, 4, 1), work)
    assert pp4.stages[0].activations > 4 * pp4.stages[3].activations / 2
    with pytest.raises(ValueError, match="attention heads 28 not divisible by TP=8"):
        estimate_memory(arch, Layout(8, 1, 1), work)
    with pytest.raises(ValueError, match="vision MLP size 3420 not divisible by TP=8"):
        estimate_memory(get_model("qwen2_5_vl_72b"), Layout(8, 1, 1), work)
    with pytest.raises(ValueError, match="unknown model 'qwen3'"):
        get_model("qwen3")


def test_cli_lists_layouts():
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["plan", "--model", "qwen2_5_vl_72b", "--gpus", "64", "--micro-batch", "1", "--recompute"]
    )
    out = io.StringIO()
    with redirect_stdout(out):
        args.func(args)
    text = out.getvalue()
    assert "TP=4 PP=4 DP=4" in text and "fits" in text
    args = parser.parse_args(["plan", "--model", "qwen2_5_vl_72b", "--gpus", "64", "--tp", "8", "--pp", "8"])
    with pytest.raises(SystemExit, match="vision MLP size 3420 not divisible by TP=8"):
        args.func(args)


def test_chunk_constant_matches_ops():
    from megatron_papo.ops.vocab_parallel import CHUNK_ELEMENTS

    assert Workload().loss_chunk_elements == CHUNK_ELEMENTS
