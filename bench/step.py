"""A PAPO training step against a GRPO step on the same batch: tokens/s, MFU, peak memory and ratios.

Real code throughout. The policy is built as the trainer builds it (``Policy``: megatron-core
Qwen2.5-VL at the launch's TP x PP, megatron DDP, megatron-core Adam), with random weights of the
``--size`` architecture. A step is the trainer's own passes on one synthetic batch of image + text
sequences: ``training.passes.token_data_pass`` (old log-probs; the masked-image log-probs of PAPO's
reference default; the reference model's with ``--ref-kl``), then ``update_pass`` (forward + backward with the
PAPO loss through megatron-core's schedules, then one optimizer step, timed on its own). Rollout and
weight sync are not timed.

Variants, timed in turn in every iteration of one run (median over iterations, each time the slowest
rank's): ``grpo``; ``papo`` (PAPO-G, masked log-probs without gradient: one extra forward-only pass);
``papo+masked_grad`` (the update carries original and masked images in a doubled micro-batch instead).
Ratios are each variant's step time over ``grpo``'s. With one mini-batch (``--mini-batches 1``, the
default) and ``--on-policy`` the old log-prob pass is skipped, as the trainer does on-policy.

``--lengths long-tail``: response lengths as rollouts have them (most short, a tail at the cap: see
``response_lengths``) instead of every sequence full. ``--pack both``: each variant padded and packed
(``trainer.pack_sequences``), with the columns ``pad_frac`` (padding tokens / all the tokens the model
runs), ``vs_padded`` (the padded row's step time over this one's), ``fwd_ms`` (one forward-only pass over
the batch, measured in the same iterations) and ``floor`` (for PAPO-G: the one-forward-pass floor of its
ratio to GRPO, 1 + fwd_ms / GRPO's step_ms); ``tokens/s`` and the MFU count real tokens only.

MFU: model FLOPs of the step (``megatron_papo.planner.flops``: a forward for each log-prob pass, three
for the update) over time x ranks x peak. Peak: ``--peak-tflops`` per rank (default on CUDA: H100 bf16
dense, 989), on CPU a measured large matmul in the bench's dtype, run on all ranks at once.
``mfu_fwdbwd``: the update's forward + backward alone (without the optimizer step).
 Peak memory, the largest rank's: ``torch.cuda.max_memory_allocated``,
on CPU the resident set's high-water mark (``VmHWM``, reset before each variant); ``step_MiB``: how far
that peak rose above the memory at the step's start (allocated; on CPU resident, after handing malloc's
freed blocks back): what the step's activations, logits and gradients needed.

    python bench/step.py --size tiny                                    # CPU, seconds
    torchrun --nproc_per_node 2 bench/step.py --size tiny               # gloo, DP=2 (or --tp 2, --pp 2)
    python bench/step.py --size 3b --seq-length 2048                    # one GPU, bfloat16
    python bench/step.py --size tiny --lengths long-tail --pack both --on-policy
    python bench/step.py --size small --lengths long-tail --pack both --on-policy   # packing at ~19M
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_papo.config import TrainConfig, TrainerConfig
from megatron_papo.models import ModelConfig, build_model, mrope_position_ids
from megatron_papo.objectives.registry import build_objective
from megatron_papo.papo.config import AlgorithmConfig
from megatron_papo.parallel import ParallelConfig, destroy_distributed, initialize_distributed
from megatron_papo.parallel.device import current_device
from megatron_papo.parallel.host_memory import reset_resident_peak, resident_bytes
from megatron_papo.planner.architectures import QWEN2_5_VL, LanguageArch, ModelArch, VisionArch
from megatron_papo.planner.flops import language_forward_flops, vision_forward_flops
from megatron_papo.policy import Policy
from megatron_papo.rollout.config import RolloutConfig
from megatron_papo.training.optimizer import OptimizerConfig
from megatron_papo.training.passes import log_prob_passes, token_data_pass, update_pass
from megatron_papo.training.sequences import (
    StepSequences,
    TokenData,
    build_sequences,
    micro_batch,
    micro_batches,
)

MIB = 2**20
H100_BF16_DENSE_TFLOPS = 989.0
SIZES = {
    # the tiny model of tools/make_tiny_model.py (~0.6M parameters)
    "tiny": ModelArch(
        "tiny",
        LanguageArch(2, 128, 4, 2, 256, 512, tie_embeddings=True, head_dim=32),
        VisionArch(2, 64, 2, 128, 128, window_size=56, fullatt_block_indexes=(1,)),
    ),
    # ~19M parameters, most of them the 32k-token vocabulary (its head's matmul and logits dominate a
    # token's cost, as the 152k vocabulary does at 3B): a size where a CPU step is the model's matmuls
    "small": ModelArch(
        "small",
        LanguageArch(4, 384, 6, 2, 1024, 32768, tie_embeddings=True, head_dim=64),
        VisionArch(2, 128, 4, 256, 384, window_size=56, fullatt_block_indexes=(1,)),
    ),
    "3b": QWEN2_5_VL["qwen2_5_vl_3b"],
}
DEFAULTS = {
    "tiny": dict(seq_length=256, image_size=56),
    "small": dict(seq_length=512, image_size=56),
    "3b": dict(seq_length=2048, image_size=448),
}
PROMPT_TEXT = 32  # text tokens of a prompt after its image; the response fills the rest
HEADER = (
    "variant",
    "step_ms",
    "logprob_ms",
    "fwdbwd_ms",
    "optim_ms",
    "tokens/s",
    "mfu_step",
    "mfu_fwdbwd",
    "peak_MiB",
    "step_MiB",
    "vs_grpo",
)
PACKING_HEADER = ("pad_frac", "vs_padded", "fwd_ms", "floor")
LONG_TAIL_AT_CAP = 0.15  # the share of responses that hit the cap in the long-tailed mode


class RandomPolicy(Policy):
    """``Policy`` with the random weights the model is built with (nothing loaded), on the GPU if any
    (as Megatron-LM's ``get_model``: norms, the patch embedding and rotary buffers are built on the CPU).
    ``optimizer_s`` adds up the seconds spent in ``optimizer.step``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.optimizer_s = 0.0
        step = self.optimizer.step

        def timed():
            start = _synchronized_time()
            result = step()
            self.optimizer_s += _synchronized_time() - start
            return result

        self.optimizer.step = timed

    def _build_loaded(self) -> torch.nn.Module:
        model = build_model(self.cfg.model)
        return model.to(current_device())


def timed_step(
    cfg: TrainConfig, policy: RandomPolicy, seqs: StepSequences, on_policy: bool = False
) -> tuple[float, float, float]:
    """The trainer's log-prob and update passes over ``seqs`` (``on_policy``: without the old log-prob
    pass): seconds of the log-prob passes, of the update's forward + backward and of its optimizer step
    (this rank; all ranks start together)."""
    seqs.token_data = TokenData()
    policy.optimizer_s = 0.0
    trainer = cfg.trainer
    dist.barrier()
    start = _synchronized_time()
    objective = build_objective(cfg.algorithm)
    token_data_pass(
        policy.model,
        policy.ref_model,
        objective,
        seqs,
        trainer.micro_batch_size,
        cfg.rollout.temperature,
        packed=trainer.pack_sequences,
        on_policy=on_policy,
    )
    middle = _synchronized_time()
    update_pass(
        policy.train_step,
        objective,
        seqs,
        sequences_per_update=trainer.update_batch_size // ps.get_data_parallel_world_size(),
        micro_batch_size=trainer.micro_batch_size,
        ppo_epochs=trainer.ppo_epochs,
        temperature=cfg.rollout.temperature,
        progress=0.0,
        generator=torch.Generator().manual_seed(trainer.seed),
        packed=trainer.pack_sequences,
    )
    update = _synchronized_time() - middle
    return middle - start, update - policy.optimizer_s, policy.optimizer_s


def timed_forward(cfg: TrainConfig, policy: RandomPolicy, seqs: StepSequences) -> float:
    """Seconds of one forward-only pass over ``seqs`` (the original images; all ranks start together)."""
    dist.barrier()
    start = _synchronized_time()
    log_prob_passes(
        policy.model,
        seqs,
        [False],
        cfg.trainer.micro_batch_size,
        cfg.rollout.temperature,
        packed=cfg.trainer.pack_sequences,
    )
    return _synchronized_time() - start


def to_device(seqs: StepSequences, device: str) -> StepSequences:
    """``seqs`` with every tensor (also inside its lists and dicts) on ``device``."""

    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, list):
            return [move(y) for y in x]
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    return StepSequences(**{f.name: move(getattr(seqs, f.name)) for f in fields(seqs)})


def _synchronized_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def algorithms(ref_kl: bool) -> dict[str, AlgorithmConfig]:
    """GRPO, PAPO-G and PAPO-G with ``masked_grad``; reference KL as the presets or off in all."""
    ref = {} if ref_kl else {"ref_kl_coef": 0.0}
    return {
        "grpo": AlgorithmConfig(name="grpo", **ref),
        "papo": AlgorithmConfig(name="papo_g", **ref),
        "papo+masked_grad": AlgorithmConfig(name="papo_g", masked_grad=True, **ref),
    }


def response_lengths(count: int, cap: int, long_tail: bool, generator: torch.Generator) -> list[int]:
    """``count`` response lengths: all ``cap``, or long-tailed like rollouts: ``LONG_TAIL_AT_CAP`` of them
    (and the first) hit the cap, the others are geometric with mean ``cap / 8`` (at least 1)."""
    if not long_tail:
        return [cap] * count
    at_cap = torch.rand(count, generator=generator) < LONG_TAIL_AT_CAP
    short = torch.empty(count).geometric_(8 / cap, generator=generator).long().clamp(1, cap)
    lengths = torch.where(at_cap, cap, short).tolist()
    return [cap, *lengths[1:]]


def synthetic_sequences(
    config, count: int, length: int, image_size: int, seed: int, long_tail: bool = False
) -> tuple[StepSequences, torch.Tensor]:
    """``count`` sequences of up to ``length`` tokens: one ``image_size``-pixel square image, then
    ``PROMPT_TEXT`` text tokens, then the response (filling ``length``, or ``response_lengths``'
    long-tailed ones, padded to ``length``); masked images have 60% of their patches zeroed.
    ``config``: the model's HF config. Returns the sequences and the images' grid [1, 3] (the same for
    all)."""
    vision = config.vision_config
    side = image_size // vision.patch_size
    grid = torch.tensor([[1, side, side]])
    patches, image_tokens = side * side, side * side // vision.spatial_merge_size**2
    response = length - image_tokens - 2 - PROMPT_TEXT
    if side % vision.spatial_merge_size or response < 1:
        unit, prompt = vision.patch_size * vision.spatial_merge_size, image_tokens + 2 + PROMPT_TEXT
        raise ValueError(
            f"--image-size {image_size} must be a multiple of {unit} and leave a response in "
            f"--seq-length {length} after {prompt} prompt tokens"
        )
    g = torch.Generator().manual_seed(seed)
    vocab = config.get_text_config().vocab_size - 8  # random text below the special tokens
    image = (
        [config.vision_start_token_id] + [config.image_token_id] * image_tokens + [config.vision_end_token_id]
    )
    prompts = [torch.cat([torch.tensor(image), torch.randint(vocab, (PROMPT_TEXT,), generator=g)])] * count
    lengths = response_lengths(count, response, long_tail, g)
    responses = [torch.randint(vocab, (n,), generator=g) for n in lengths]
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = [torch.randn(patches, width, generator=g) for _ in range(count)]
    masked = [x * (torch.rand(patches, 1, generator=g) >= 0.6) for x in pixels]
    seqs = build_sequences(
        prompts,
        responses,
        pixel_values=pixels,
        masked_pixel_values=masked,
        image_grid_thw=[grid] * count,
        advantages=torch.randn(count, generator=g),
        pad_id=config.get_text_config().pad_token_id,
        length=length,
        position_fn=partial(mrope_position_ids, hf_config=config),
    )
    return seqs, grid


def forward_flops(arch: ModelArch, sequences: int, length: int | list[int], grid: torch.Tensor) -> int:
    """Model FLOPs of one forward pass over ``sequences`` sequences of ``length`` tokens (or one length
    per sequence), each with one image of ``grid``."""
    _, h, w = grid[0].tolist()
    lengths = [length] * sequences if isinstance(length, int) else length
    language = sum(language_forward_flops(arch.language, 1, n) for n in lengths)
    return language + sequences * vision_forward_flops(arch.vision, h, w)


def forward_passes(algo: AlgorithmConfig, on_policy: bool) -> tuple[int, int]:
    """Forward-pass equivalents of a step's log-prob passes and of its update (forward + backward: 3;
    ``masked_grad`` doubles the update's micro-batches), as ``Trainer`` runs them (``on_policy``: no old
    log-prob pass)."""
    objective = build_objective(algo)
    old = int(not on_policy or objective.old_log_probs_in_prepare)
    log_prob = old + int(objective.masked_log_probs_needed) + int(objective.ref_log_probs_needed)
    return log_prob, 3 * (2 if objective.masked_logits_in_update else 1)


def _reset_peak_memory() -> int:
    """Reset the peak; return the memory it starts from (CUDA: allocated; CPU: resident, once the freed
    blocks malloc keeps are handed back, so that a step's peak over it is what the step needed)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return reset_resident_peak()


def _peak_memory() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resident_bytes("VmHWM")


def measured_peak_flops(dtype: torch.dtype, seconds: float = 0.3, n: int = 1024) -> float:
    """FLOP/s of this rank's repeated n x n matmul, all ranks at once (sharing the machine as in a step)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    dist.barrier()
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / elapsed


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument(
        "--seq-length", type=int, help="tokens per sequence (tiny: 256, small: 512, 3b: 2048)"
    )
    parser.add_argument("--image-size", type=int, help="image side in pixels (tiny: 56, small: 56, 3b: 448)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=2, help="per data-parallel rank and step")
    parser.add_argument("--mini-batches", type=int, default=1, help="optimizer steps per step")
    parser.add_argument(
        "--on-policy",
        action="store_true",
        help="skip the old log-prob pass (as the trainer)",
    )
    parser.add_argument("--lengths", choices=["full", "long-tail"], default="full", help="response lengths")
    parser.add_argument("--pack", choices=["off", "on", "both"], default="off", help="packed sequences")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: cuda bf16, cpu fp32")
    parser.add_argument("--attention", choices=["auto", "sdpa", "local", "te"], default="auto")
    parser.add_argument("--recompute", action="store_true", help="full activation recomputation")
    parser.add_argument("--ref-kl", action="store_true", help="reference-KL term and its model in all")
    parser.add_argument("--peak-tflops", type=float, help="per rank (default: cuda 989, cpu measured)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.micro_batches % args.mini_batches:
        parser.error(f"--mini-batches {args.mini_batches} must divide --micro-batches {args.micro_batches}")
    if args.on_policy and args.mini_batches != 1:
        parser.error("--on-policy needs --mini-batches 1")
    return args


def _config(args: argparse.Namespace, hf_path: str, dtype: str, parallel: ParallelConfig) -> TrainConfig:
    sequences = args.micro_batch_size * args.micro_batches * ps.get_data_parallel_world_size()
    return TrainConfig(
        model=ModelConfig(hf_path=hf_path, dtype=dtype, attention=args.attention, recompute=args.recompute),
        parallel=parallel,
        rollout=RolloutConfig(n=1),  # a "prompt" per sequence
        optimizer=OptimizerConfig(bf16=dtype == "bfloat16"),
        trainer=TrainerConfig(
            steps=1,
            rollout_batch_size=sequences,
            update_batch_size=sequences // args.mini_batches,
            micro_batch_size=args.micro_batch_size,
            pack_sequences=args.pack != "off",
        ),
    )


def packings(args: argparse.Namespace) -> list[bool]:
    return {"off": [False], "on": [True], "both": [False, True]}[args.pack]


def variants(args: argparse.Namespace) -> dict[str, tuple[AlgorithmConfig, bool]]:
    """Name -> (algorithm, packed): ``algorithms`` at each of the ``--pack`` settings."""
    return {
        name + ("/packed" if packed else ""): (algo, packed)
        for packed in packings(args)
        for name, algo in algorithms(args.ref_kl).items()
    }


@dataclass
class Work:
    """One step's work over all DP ranks: real tokens, the tokens the padded and the packed model inputs
    hold, and the model FLOPs of one forward pass over the real tokens."""

    tokens: float
    padded_tokens: float
    packed_tokens: float
    forward_flops: float


def step_work(arch: ModelArch, cfg: TrainConfig, seqs: StepSequences, grid: torch.Tensor) -> Work:
    """``Work`` of this DP rank's ``seqs``, summed over the DP ranks."""
    lengths = seqs.attention_mask.sum(-1).tolist()
    rows = micro_batches(seqs, torch.arange(len(seqs)), cfg.trainer.micro_batch_size)
    packed = sum(micro_batch(seqs, idx, packed=True).input_ids.shape[1] for idx in rows)
    flops = forward_flops(arch, len(seqs), lengths, grid)
    figures = [sum(lengths), seqs.attention_mask.numel(), packed, flops]
    summed = torch.tensor(figures, dtype=torch.float64, device=current_device())
    dist.all_reduce(summed, group=ps.get_data_parallel_group())
    return Work(*summed.tolist())


def run(
    args: argparse.Namespace, cfg: TrainConfig
) -> tuple[dict[str, list[float] | None], dict[bool, float], Work, torch.Tensor]:
    """Per variant: [median seconds of the step, its log-prob passes, its forward + backward and its
    optimizer step; peak memory bytes], each the largest rank's figure, or None where it ran out of GPU
    memory; per packing, the median seconds of one forward-only pass; the step's ``Work``; the images'
    grid [1, 3]."""
    named = variants(args)
    rounds = args.warmup + args.iters
    policy = RandomPolicy(cfg, rounds * len(named), with_ref=args.ref_kl, with_engine=False)
    count = args.micro_batch_size * args.micro_batches
    seqs, grid = synthetic_sequences(
        policy.hf_config,
        count,
        args.seq_length,
        args.image_size,
        args.seed + ps.get_data_parallel_rank(),
        long_tail=args.lengths == "long-tail",
    )
    work = step_work(SIZES[args.size], cfg, seqs, grid)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seqs = to_device(seqs, device)
    samples: dict[str, list[list[float]] | None] = {name: [] for name in named}
    forward: dict[bool, list[float]] = {packed: [] for packed in packings(args)}
    peaks = {name: [0.0, 0.0] for name in named}  # peak, and its rise over the step's start
    for round_ in range(rounds):
        for packed in forward:
            cfg.trainer.pack_sequences = packed
            seconds = torch.tensor([timed_forward(cfg, policy, seqs)], dtype=torch.float64, device=device)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            if round_ >= args.warmup:
                forward[packed].append(float(seconds))
        for name, (algo, packed) in named.items():  # interleaved: drifts of a shared machine hit all alike
            if samples[name] is None:
                continue
            cfg.algorithm, cfg.trainer.pack_sequences = algo, packed
            start = _reset_peak_memory()
            try:
                phases = timed_step(cfg, policy, seqs, args.on_policy)
            except torch.OutOfMemoryError:  # one GPU: with more ranks the others would wait in a collective
                samples[name] = None
                torch.cuda.empty_cache()
                continue
            peak = _peak_memory()
            stats = torch.tensor([*phases, peak, peak - start], dtype=torch.float64, device=device)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            *phases, peak, rise = stats.tolist()
            peaks[name] = [max(peaks[name][0], peak), max(peaks[name][1], rise)]
            if round_ >= args.warmup:
                samples[name].append([sum(phases), *phases])
    results = {
        name: None if runs is None else [*map(statistics.median, zip(*runs, strict=True)), *peaks[name]]
        for name, runs in samples.items()
    }
    return results, {k: statistics.median(v) for k, v in forward.items()}, work, grid


def _row(cells: list[str]) -> str:
    return f"{cells[0]:<18}" + "".join(f"{c:>11}" for c in cells[1:])


def report(
    args: argparse.Namespace,
    cfg: TrainConfig,
    results: dict[str, list[float] | None],
    forward_s: dict[bool, float],
    work: Work,
    grid: torch.Tensor,
    peak: float,
) -> None:
    """Print the setup and one row per variant; ``peak``: the FLOP/s of all ranks together."""
    arch, world, dp = SIZES[args.size], dist.get_world_size(), ps.get_data_parallel_world_size()
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    source = "--peak-tflops" if args.peak_tflops else ("H100 bf16 dense" if cuda else "measured matmul")
    on_policy = args.on_policy
    print(
        f"model {arch.name} ({arch.params(1) / 1e6:.2f}M parameters), {device} {cfg.model.dtype}, "
        f"{world} ranks (TP{args.tp} PP{args.pp} DP{dp}), attention {args.attention}, recompute "
        f"{args.recompute}, reference KL {args.ref_kl}"
    )
    print(
        f"per DP rank: {args.micro_batches} micro-batches x {args.micro_batch_size} sequences of up to "
        f"{args.seq_length} tokens ({args.lengths} responses: {work.tokens / dp:.0f} real tokens), one "
        f"{args.image_size}px image ({int(grid[0].prod())} patches) each; {args.mini_batches} mini-batches "
        f"({'on-policy: no old log-prob pass' if on_policy else 'with the old log-prob pass'})"
    )
    print(
        f"peak {peak / world / 1e12:.4g} TFLOP/s per rank ({source}); a forward pass "
        f"{work.forward_flops / 1e9:.4g} GFLOP; median of {args.iters} iterations after {args.warmup} warm-up"
    )
    header = list(HEADER) + (list(PACKING_HEADER) if args.pack != "off" else [])
    print(_row(header))
    for name, figures in results.items():
        if figures is None:
            print(_row([name] + ["OOM"] * (len(header) - 1)))
            continue
        algo, packed = variants(args)[name]
        *seconds, memory, rise = figures
        step_s, _, fwd_bwd_s, _ = seconds
        baseline = results["grpo/packed" if packed else "grpo"]
        log_prob_passes, update_passes = forward_passes(algo, on_policy)
        cells = [f"{x * 1e3:.1f}" for x in seconds] + [
            f"{work.tokens / step_s:.1f}",
            f"{(log_prob_passes + update_passes) * work.forward_flops / step_s / peak:.4f}",
            f"{update_passes * work.forward_flops / fwd_bwd_s / peak:.4f}",
            f"{memory / MIB:.1f}",
            f"{rise / MIB:.1f}",
            f"{step_s / baseline[0]:.3f}" if baseline else "-",
        ]
        if args.pack != "off":
            padded = results.get(name.removesuffix("/packed"))
            model_tokens = work.packed_tokens if packed else work.padded_tokens
            papo_g = baseline and name in ("papo", "papo/packed")  # one forward-only pass more than GRPO
            floor = 1 + forward_s[packed] / baseline[0] if papo_g else None
            cells += [
                f"{1 - work.tokens / model_tokens:.3f}",
                f"{padded[0] / step_s:.3f}" if padded else "-",
                f"{forward_s[packed] * 1e3:.1f}",
                f"{floor:.3f}" if floor is not None else "-",
            ]
        print(_row([name, *cells]))


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    # NCCL for the model's tensors; gloo for this script's host-side all-reduces (peak FLOPs)
    parallel = ParallelConfig(args.tp, args.pp, backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    initialize_distributed(parallel, seed=args.seed)
    try:
        if args.peak_tflops or cuda:
            peak = (args.peak_tflops or H100_BF16_DENSE_TFLOPS) * 1e12
        else:
            peak = measured_peak_flops(getattr(torch, dtype))
        total_peak = torch.tensor([peak], dtype=torch.float64)
        dist.all_reduce(total_peak)
        with tempfile.TemporaryDirectory() as hf_path:  # config.json only: the weights stay random
            SIZES[args.size].to_hf_config().save_pretrained(hf_path)
            cfg = _config(args, hf_path, dtype, parallel)
            results, forward_s, work, grid = run(args, cfg)
        if dist.get_rank() == 0:
            report(args, cfg, results, forward_s, work, grid, float(total_peak))
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
