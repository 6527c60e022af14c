"""``megatron-papo plan``: per-GPU memory of a job and the TP x PP x DP layouts that fit, before queueing.

megatron-papo plan --model qwen2_5_vl_72b --gpus 64 --micro-batch 1 --recompute
megatron-papo plan --model qwen2_5_vl_7b --gpus 8 --tp 4 --pp 1      # one layout, stage by stage
megatron-papo plan --model qwen3_vl_8b --gpus 8 --micro-batch 1 --recompute
"""

from __future__ import annotations

import argparse
import sys

from megatron_papo.planner.architectures import MODELS, get_model
from megatron_papo.planner.memory import GIB, Layout, MemoryEstimate, Workload, estimate_memory, plan


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to ``subparsers`` (an ``argparse`` subparsers action)."""
    p = subparsers.add_parser(
        "plan",
        help="per-GPU memory and the TP/PP/DP layouts that fit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help=f"{', '.join(MODELS)} or an HF model directory")
    p.add_argument("--gpus", type=int, required=True, help="training GPUs (rollout GPUs not counted)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="largest TP (TP stays inside a node)")
    p.add_argument("--tp", type=int, help="show this layout only (with --pp), stage by stage")
    p.add_argument("--pp", type=int, help="show this layout only (with --tp)")
    w = Workload()
    p.add_argument("--micro-batch", type=int, default=w.micro_batch_size, help="sequences per micro-batch")
    p.add_argument("--seq-length", type=int, default=w.seq_length, help="prompt + response tokens")
    p.add_argument("--images", type=int, default=w.images, help="images per sequence")
    p.add_argument("--image-pixels", type=int, default=w.image_pixels, help="pixels per image (max_pixels)")
    p.add_argument("--micro-batches", type=int, help="per optimizer step and DP rank (default: >= PP)")
    p.add_argument("--recompute", action="store_true", help="activation recomputation of decoder layers")
    p.add_argument(
        "--masked-grad", action="store_true", help="algorithm.masked_grad: both forwards keep grads"
    )
    p.add_argument("--ref-model", action="store_true", help="a reference model for the KL term (PAPO-G)")
    p.add_argument("--rollout", choices=["vllm", "embedded"], default=w.rollout)
    p.add_argument("--no-distributed-optimizer", action="store_true", help="optimizer state not sharded")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--kernels", choices=["fused", "local"], default=w.kernels, help="TE/flash or torch")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=w.dtype)
    p.add_argument("--overhead", type=float, default=w.overhead_gib, help="GiB for CUDA context, NCCL, ...")
    p.set_defaults(func=run)
    return p


def _workload(args: argparse.Namespace) -> Workload:
    return Workload(
        micro_batch_size=args.micro_batch,
        seq_length=args.seq_length,
        images=args.images,
        image_pixels=args.image_pixels,
        num_microbatches=args.micro_batches,
        recompute=args.recompute,
        masked_grad=args.masked_grad,
        ref_model=args.ref_model,
        rollout=args.rollout,
        distributed_optimizer=not args.no_distributed_optimizer,
        sequence_parallel=args.sequence_parallel,
        kernels=args.kernels,
        dtype=args.dtype,
        overhead_gib=args.overhead,
    )


def _gib(n: int) -> str:
    return f"{n / GIB:7.1f}"


def _stage_table(e: MemoryEstimate) -> str:
    cols = (
        "weights",
        "grads",
        "optimizer",
        "ref_weights",
        "rollout_weights",
        "activations",
        "loss_peak",
        "nograd_peak",
        "overhead",
    )
    lines = ["stage  params(M) " + " ".join(f"{c:>11}" for c in cols) + "    peak  (GiB)"]
    for s in e.stages:
        values = " ".join(f"{_gib(getattr(s, c)):>11}" for c in cols)
        lines.append(f"{s.stage:>5} {s.params / 1e6:10.1f} {values} {_gib(s.peak)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    """Print the layouts of ``args.gpus`` GPUs that fit (or one layout's stages with --tp/--pp)."""
    try:
        arch, work = get_model(args.model), _workload(args)
        if (args.tp is None) != (args.pp is None):
            raise ValueError("give both --tp and --pp, or neither")
        if args.tp is not None:
            if args.gpus % (args.tp * args.pp):
                raise ValueError(f"--gpus {args.gpus} is not divisible by TP x PP = {args.tp * args.pp}")
            e = estimate_memory(arch, Layout(args.tp, args.pp, args.gpus // (args.tp * args.pp)), work)
            verdict = "fits" if e.peak <= args.gpu_memory * GIB else "does NOT fit"
            print(
                f"{arch.name} on {args.gpus} GPUs, {e.layout}: peak {e.peak / GIB:.1f} GiB, {verdict} "
                f"in {args.gpu_memory:g} GiB\n{_stage_table(e)}"
            )
            return
        rows = plan(arch, args.gpus, args.gpu_memory, work, max_tp=args.gpus_per_node)
    except ValueError as err:
        sys.exit(f"megatron-papo plan: {err}")
    print(
        f"{arch.name} ({arch.params(1) / 1e9:.2f}B parameters) on {args.gpus} GPUs of {args.gpu_memory:g} GiB"
    )
    print(f"{'layout':<20} {'peak GiB':>9} {'stage':>6}  weights+grads+optim  activations  verdict")
    for e, ok in rows:
        s = e.peak_stage
        print(
            f"{e.layout!s:<20} {e.peak / GIB:9.1f} {s.stage:>6}  "
            f"{(s.weights + s.grads + s.optimizer) / GIB:19.1f} {s.activations / GIB:12.1f}  "
            f"{'fits' if ok else 'too big'}"
        )
    if not any(ok for _, ok in rows):
        print("no layout fits: try --recompute, a smaller --micro-batch, or more GPUs")
