"""Peak memory and time of the vocab-parallel ops against the naive path, both in one run.

The work is what the PAPO loss needs from the original-image logits p and the masked-image logits q
(``[tokens, vocab]``, one TP rank's view at TP=1): log-prob of the sampled token and entropy of both, and
the exact KL(p || q); forward and backward (gradients to both logit tensors).

- ``fused``: ``log_probs_entropies_and_kl`` from ``megatron_papo.ops`` (one chunked pass, as the loss uses);
- ``naive``: ``log_softmax`` of both (in float32, as the reference implementations do), gather, sums.

Extra memory is the peak above the inputs, not counting the two ``[tokens, vocab]`` gradients the
backward must return. On CUDA: ``torch.cuda.max_memory_allocated``; the byte floor is the bytes that
must move (read p and q in the forward; read them again and write both gradients in the backward) over
the copy bandwidth measured on the device. On CPU each measurement runs in a fresh process and the
memory is its peak resident set size (``ru_maxrss``) above the one before the work.

    python bench/loss_ops.py --device cuda                      # vocab 151,936, 2k-16k tokens
    python bench/loss_ops.py --device cpu --tokens 256 1024 --vocab 32768
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch

from megatron_papo.ops.vocab_parallel import log_probs_entropies_and_kl

GIB = 2**30


def _inputs(tokens: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    p = (torch.randn(tokens, vocab, generator=g, device=device, dtype=torch.float32) * 3).to(dtype)
    q = (p.float() + torch.randn(tokens, vocab, generator=g, device=device)).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    weights = torch.randn(5, tokens, generator=g, device=device)
    return p.requires_grad_(), q.requires_grad_(), targets, weights


def _fused(p, q, targets, temperature, chunk_size):
    return log_probs_entropies_and_kl(p, q, targets, temperature, chunk_size)


def _naive(p, q, targets, temperature, chunk_size):
    log_p = torch.log_softmax(p.float() / temperature, dim=-1)
    log_q = torch.log_softmax(q.float() / temperature, dim=-1)
    lp_p = log_p.gather(-1, targets[:, None]).squeeze(-1)
    lp_q = log_q.gather(-1, targets[:, None]).squeeze(-1)
    h_p = -(log_p.exp() * log_p).sum(-1)
    h_q = -(log_q.exp() * log_q).sum(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return lp_p, h_p, lp_q, h_q, kl


PATHS = {"fused": _fused, "naive": _naive}


def _run_once(path: str, p, q, targets, weights, temperature: float, chunk_size: int | None) -> None:
    p.grad = q.grad = None
    outputs = PATHS[path](p, q, targets, temperature, chunk_size)
    sum((w * o.float()).sum() for w, o in zip(weights, outputs, strict=True)).backward()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _cpu_child(path, tokens, vocab, dtype, temperature, chunk_size, repeats, queue) -> None:
    torch.manual_seed(0)
    p, q, targets, weights = _inputs(tokens, vocab, dtype, "cpu")
    grads = 2 * p.numel() * p.element_size()
    before = _rss_bytes()
    start = time.perf_counter()
    for _ in range(repeats):
        _run_once(path, p, q, targets, weights, temperature, chunk_size)
    seconds = (time.perf_counter() - start) / repeats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put((max(peak - before - grads, 0), seconds))


def measure_cpu(path, tokens, vocab, dtype, temperature, chunk_size, repeats) -> tuple[int, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(
        target=_cpu_child, args=(path, tokens, vocab, dtype, temperature, chunk_size, repeats, queue)
    )
    child.start()
    result = queue.get()
    child.join()
    return result


def measure_cuda(
    path, tokens, vocab, dtype, temperature, chunk_size, repeats
) -> tuple[int | None, float | None]:
    torch.cuda.empty_cache()
    p, q, targets, weights = _inputs(tokens, vocab, dtype, "cuda")
    grads = 2 * p.numel() * p.element_size()
    try:
        _run_once(path, p, q, targets, weights, temperature, chunk_size)  # warm-up
        p.grad = q.grad = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(repeats):
            _run_once(path, p, q, targets, weights, temperature, chunk_size)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
        return torch.cuda.max_memory_allocated() - before - grads, seconds
    except torch.OutOfMemoryError:
        return None, None
    finally:
        p.grad = q.grad = None
        del p, q


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    x = torch.empty(GIB // 2, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (time.perf_counter() - start)


def _fmt_gib(x: int | None) -> str:
    return "OOM" if x is None else f"{x / GIB:8.3f}"


def _fmt_ms(x: float | None) -> str:
    return "OOM" if x is None else f"{x * 1e3:9.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:7.2f}x"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default=None, help="cuda: bf16, cpu: fp32"
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: the op's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    measure = measure_cuda if args.device == "cuda" else measure_cpu
    bandwidth = copy_bandwidth(args.device) if args.device == "cuda" else None
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"device {name}, vocab {args.vocab}, {dtype}, temperature {args.temperature}, chunk {args.chunk_size}"
    )
    print("extra memory: peak above the inputs, excluding the two logit gradients")
    if bandwidth:
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; byte floor: read p, q twice + write 2 gradients")
    header = f"{'tokens':>7} | {'naive GiB':>9} {'fused GiB':>9} {'mem ratio':>9} | "
    header += f"{'naive ms':>9} {'fused ms':>9} {'speedup':>8}"
    header += f" | {'floor ms':>9} {'fused/floor':>11} {'naive/floor':>11}" if bandwidth else ""
    print(header)
    for tokens in args.tokens:
        results = {
            path: measure(path, tokens, args.vocab, dtype, args.temperature, args.chunk_size, args.repeats)
            for path in PATHS
        }
        (naive_mem, naive_s), (fused_mem, fused_s) = results["naive"], results["fused"]
        line = f"{tokens:>7} | {_fmt_gib(naive_mem):>9} {_fmt_gib(fused_mem):>9} "
        line += f"{_ratio(naive_mem, fused_mem):>9} | "
        line += f"{_fmt_ms(naive_s):>9} {_fmt_ms(fused_s):>9} {_ratio(naive_s, fused_s):>8}"
        if bandwidth:
            floor = 6 * tokens * args.vocab * torch.finfo(dtype).bits // 8 / bandwidth
            line += f" | {floor * 1e3:9.1f} {_ratio(fused_s, floor):>11} {_ratio(naive_s, floor):>11}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
