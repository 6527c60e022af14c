"""Per-GPU memory of a PAPO training job, by pipeline stage, and the TP x PP x DP layouts that fit a GPU.

Static, per rank of stage ``s`` with ``P_s`` parameters (``architectures.ModelArch.stage_params``):

- weights: ``P_s`` x 2 bytes (bf16) or 4 (fp32);
- gradients: ``P_s`` x 4, megatron-core DDP's fp32 main-grad buffer (``grad_reduce_in_fp32``);
- optimizer: Adam's two moments (8 bytes) plus, for bf16 weights, the fp32 master copy (4 bytes), divided
  by DP when megatron-core's distributed optimizer shards them;
- reference model (the ref-KL term of PAPO-G): another copy of the weights, no gradients;
- the embedded rollout engine (``rollout.backend: embedded``): a whole unsharded copy of the model
  (vLLM rollout runs on other GPUs and costs nothing here).

Activations, per micro-batch of ``micro_batch_size`` sequences of ``seq_length`` tokens (each with
``images`` images of ``image_pixels`` pixels): the decoder layers of the stage (``activations``), the
vision tower on the first stage, the final norm and logits on the last stage. PAPO runs two forwards:
with ``masked_grad`` the masked-image copy of each sequence rides in the same micro-batch with gradient,
doubling the batch; by default (the reference) the masked-image log-probs come from a forward without
gradient before the update, which keeps no activations. Megatron-core's 1F1B schedule keeps up to
``pp - s`` micro-batches in flight on stage ``s``. With ``recompute`` each decoder layer keeps only its
input and one layer at a time is rebuilt during backward (the vision tower is not recomputed).

A step's peak on a stage is the static memory plus the larger of: the training pass (in-flight
activations plus, on the last stage, the loss backward's logits gradient and chunk buffers) and a
forward without gradient (old/masked/reference log-probs: one layer's transients plus logits and loss
buffers). ``overhead_gib`` covers the CUDA context, NCCL buffers and allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_papo.planner.activations import (
    Kernels,
    LayerShape,
    layer_activation_bytes,
    logits_bytes,
    loss_backward_bytes,
    loss_chunk_bytes,
    norm_activation_bytes,
    vision_activation_bytes,
)
from megatron_papo.planner.architectures import ModelArch

GIB = 1 << 30


@dataclass(frozen=True)
class Workload:
    """What one training step of a rank runs (reference recipe: micro-batch 4, 4096 + 2048 tokens, one
    image of up to 1003520 pixels)."""

    micro_batch_size: int = 4
    seq_length: int = 6144  # prompt (image tokens included) + response
    images: int = 1  # per sequence
    image_pixels: int = 1003520
    num_microbatches: int | None = None  # per optimizer step and DP rank; None: at least PP
    recompute: bool = False
    masked_grad: bool = False
    ref_model: bool = False
    rollout: Literal["vllm", "embedded"] = "vllm"
    distributed_optimizer: bool = True
    sequence_parallel: bool = False
    kernels: Kernels = "fused"
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    loss_chunk_elements: int = 2**24  # megatron_papo.ops.vocab_parallel.CHUNK_ELEMENTS
    overhead_gib: float = 4.0

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "seq_length", "image_pixels", "loss_chunk_elements"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.images < 0 or self.overhead_gib < 0:
            raise ValueError("images and overhead_gib must be >= 0")
        if self.num_microbatches is not None and self.num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {self.num_microbatches}")

    @property
    def elem(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return f"TP={self.tp} PP={self.pp} DP={self.dp}"


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one rank of one pipeline stage."""

    stage: int
    params: int
    weights: int
    grads: int
    optimizer: int
    ref_weights: int
    rollout_weights: int
    activations: int  # saved for backward by all micro-batches in flight
    loss_peak: int  # the loss backward's transients (last stage)
    nograd_peak: int  # a forward without gradient (old / masked / reference log-probs)
    overhead: int

    @property
    def static(self) -> int:
        models = self.weights + self.ref_weights + self.rollout_weights
        return models + self.grads + self.optimizer + self.overhead

    @property
    def peak(self) -> int:
        return self.static + max(self.activations + self.loss_peak, self.nograd_peak)


@dataclass(frozen=True)
class MemoryEstimate:
    model: str
    layout: Layout
    workload: Workload
    stages: list[StageMemory] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(s.peak for s in self.stages)

    @property
    def peak_stage(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.peak)


def _layer_bytes(arch: ModelArch, work: Workload, batch: int, tp: int) -> int:
    lm = arch.language
    shape = LayerShape(lm.hidden_size, lm.q_size, lm.kv_size, lm.ffn_hidden_size, lm.num_heads, lm.head_dim)
    return layer_activation_bytes(
        shape, work.seq_length, batch, tp, work.sequence_parallel, work.kernels, work.elem
    )


def micro_batch_activation_bytes(arch: ModelArch, layout: Layout, work: Workload, stage: int) -> int:
    """Bytes one micro-batch saves for backward on one rank of ``stage``."""
    lm, tp, pp, elem = arch.language, layout.tp, layout.pp, work.elem
    batch = work.micro_batch_size * (2 if work.masked_grad else 1)
    tokens = batch * work.seq_length
    layer = _layer_bytes(arch, work, batch, tp)
    layers = lm.num_layers // pp
    if work.recompute:
        sp = tp if work.sequence_parallel else 1
        total = layers * tokens * lm.hidden_size // sp * elem + layer
    else:
        total = layers * layer
    if stage == 0:
        patches = batch * work.images * arch.vision.patches(work.image_pixels)
        total += vision_activation_bytes(arch.vision, patches, tp, elem) if patches else 0
    if stage == pp - 1:
        total += norm_activation_bytes(lm.hidden_size, tokens, tp, work.sequence_parallel, work.kernels, elem)
        total += logits_bytes(tokens, lm.vocab_size, tp, elem)
    return total


def estimate_memory(arch: ModelArch, layout: Layout, work: Workload) -> MemoryEstimate:
    """Per-stage memory of one rank; raises ValueError when the layout cannot hold the model."""
    problem = arch.layout_problem(layout.tp, layout.pp)
    if problem:
        raise ValueError(f"{arch.name} at {layout}: {problem}")
    if work.sequence_parallel and work.kernels == "local":
        raise ValueError("sequence parallelism needs kernels='fused' (megatron-core's torch norms lack it)")
    tp, pp, elem = layout.tp, layout.pp, work.elem
    lm = arch.language
    optimizer_bytes = 8 + (4 if work.dtype == "bfloat16" else 0)
    shard = layout.dp if work.distributed_optimizer else 1
    whole_model = arch.params(1) * elem
    stages = []
    for stage in range(pp):
        params = arch.stage_params(tp, pp, stage)
        in_flight = pp - stage if work.num_microbatches is None else min(pp - stage, work.num_microbatches)
        last = stage == pp - 1
        chunk = work.loss_chunk_elements
        tokens = work.micro_batch_size * (2 if work.masked_grad else 1) * work.seq_length
        # without gradient: one layer's tensors live at a time; the loss needs no logits gradient
        nograd = _layer_bytes(arch, work, work.micro_batch_size, tp)
        if last:
            nograd_tokens = work.micro_batch_size * work.seq_length
            nograd += logits_bytes(nograd_tokens, lm.vocab_size, tp, elem)
            nograd += loss_chunk_bytes(nograd_tokens, lm.vocab_size, tp, chunk)
        stages.append(
            StageMemory(
                stage=stage,
                params=params,
                weights=params * elem,
                grads=params * 4,
                optimizer=params * optimizer_bytes // shard,
                ref_weights=params * elem if work.ref_model else 0,
                rollout_weights=whole_model if work.rollout == "embedded" else 0,
                activations=in_flight * micro_batch_activation_bytes(arch, layout, work, stage),
                loss_peak=loss_backward_bytes(tokens, lm.vocab_size, tp, elem, chunk) if last else 0,
                nograd_peak=nograd,
                overhead=int(work.overhead_gib * GIB),
            )
        )
    return MemoryEstimate(arch.name, layout, work, stages)


def candidate_layouts(arch: ModelArch, gpus: int, max_tp: int = 8) -> list[Layout]:
    """Every TP x PP x DP = ``gpus`` the model can be split into (TP within a node: at most ``max_tp``)."""
    layouts = []
    for tp in (t for t in range(1, max_tp + 1) if gpus % t == 0):
        for pp in (p for p in range(1, gpus // tp + 1) if (gpus // tp) % p == 0):
            if arch.layout_problem(tp, pp) is None:
                layouts.append(Layout(tp, pp, gpus // (tp * pp)))
    return layouts


def plan(
    arch: ModelArch, gpus: int, gpu_memory_gib: float, work: Workload, max_tp: int = 8
) -> list[tuple[MemoryEstimate, bool]]:
    """All layouts of ``gpus`` GPUs with their estimates and whether each fits ``gpu_memory_gib``;
    fitting layouts first, the most data-parallel (least model-parallel) first, then by peak."""
    if gpus < 1 or gpu_memory_gib <= 0:
        raise ValueError(f"need gpus >= 1 and gpu memory > 0, got {gpus} GPUs of {gpu_memory_gib} GiB")
    budget = gpu_memory_gib * GIB
    estimates = [estimate_memory(arch, layout, work) for layout in candidate_layouts(arch, gpus, max_tp)]
    rows = [(e, e.peak <= budget) for e in estimates]
    return sorted(rows, key=lambda r: (not r[1], r[0].layout.tp * r[0].layout.pp, r[0].peak))
