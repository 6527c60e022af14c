"""Export memory and time of a random Qwen2.5-VL-3B: HF -> megatron -> HF, bitwise, with each rank's peak.

The model is the released 3B's architecture (``planner.architectures.QWEN2_5_VL["qwen2_5_vl_3b"]``, tied
embeddings, 3.75B parameters) with random bfloat16 weights, written here (nothing is downloaded). For
each layout (default TP2 x PP2 and TP1 x PP4) the run converts it with ``tools/convert_checkpoint.py
hf-to-mcore``, then exports the checkpoint back on ``torchrun`` ranks as ``mcore-to-hf`` does
(``conversion.load_mcore_model`` + ``save_hf_directory``), each rank measuring:

- ``base``: resident memory once its shard is loaded (allocator trimmed): libraries + its own shard;
- ``peak``: the high-water mark of the export alone (``/proc/self/clear_refs`` resets it first);
- the bound ``base + buffer``: the export may add at most its buffer (``--buffer-mib``) on any rank.

The first layout also runs the vLLM directory sync's write (``rollout.vllm_sync.write_weight_directory``
of ``export_stream(to="rank0")``, the per-step work of ``weight_sync: directory`` before the servers'
reload) the same way. The exported directory is compared tensor by tensor with the source, and the
export's time with ``cp`` of the same safetensors files on the same disk (both followed by ``sync``).

    python bench/export_3b.py --work /tmp/export3b                 # both layouts, ~15 min on 2 cores
    python bench/export_3b.py --work /tmp/export3b --layouts 2x2   # one layout
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30


def make_random_3b(out_dir: str, smoke: bool, seed: int = 0) -> str:
    """The 3B's config (bfloat16) and random weights, one tensor in memory at a time, as ``out_dir``;
    ``smoke``: 4 LM and 4 vision layers, an 8k vocabulary (to try the bench in a minute)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_papo.models.hf_directory import SHARD_BYTES, write_weights
    from megatron_papo.models.weight_stream import Piece, TensorSpec, WeightStream
    from megatron_papo.models.weights import HEAD
    from megatron_papo.planner.architectures import QWEN2_5_VL

    arch = QWEN2_5_VL["qwen2_5_vl_3b"]
    if smoke:
        language = replace(arch.language, num_layers=4, vocab_size=8192)
        arch = replace(
            arch, language=language, vision=replace(arch.vision, depth=4, fullatt_block_indexes=(3,))
        )
    config = arch.to_hf_config()
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        shapes = {
            n: tuple(t.shape) for n, t in Qwen2_5_VLForConditionalGeneration(config).state_dict().items()
        }
    shapes.pop(HEAD)  # tied: the checkpoint holds the embedding only
    specs = [TensorSpec(n, torch.bfloat16, s) for n, s in shapes.items()]
    g = torch.Generator().manual_seed(seed)

    def pieces():
        for s in specs:
            yield Piece(s.name, 0, (torch.randn(s.shape, generator=g) * 0.02).to(torch.bfloat16))

    tmp = out_dir + ".tmp"  # renamed when complete: a partial model is never reused
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    config.save_pretrained(tmp)
    largest = max(s.nbytes for s in specs)
    write_weights(WeightStream(specs, pieces()), tmp, SHARD_BYTES, 2 * largest, config.model_type)
    os.replace(tmp, out_dir)
    return out_dir


def _measured(fn) -> dict:
    """Run ``fn`` with the resident high-water mark reset first; its seconds and peak."""
    from megatron_papo.parallel.host_memory import reset_resident_peak, resident_bytes

    gc.collect()
    base = reset_resident_peak()
    start = time.monotonic()
    fn()
    return {"base": base, "peak": resident_bytes("VmHWM"), "seconds": time.monotonic() - start}


def export_rank(ckpt: str, hf_dir: str, out: str, sync_dir: str | None, buffer_bytes: int) -> None:
    """One torchrun rank: load the checkpoint's shard, export it (and write a directory sync); rank 0
    prints every rank's figures as JSON."""
    import torch.distributed as dist

    from megatron_papo.models.conversion import load_mcore_model
    from megatron_papo.models.hf_directory import save_hf_directory
    from megatron_papo.models.weights import export_stream
    from megatron_papo.parallel import ParallelConfig, destroy_distributed, initialize_distributed
    from megatron_papo.rollout.vllm_sync import write_weight_directory

    tp, pp = (int(x) for x in os.environ["BENCH_LAYOUT"].split("x"))
    initialize_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    model = load_mcore_model(ckpt, hf_dir, "bfloat16")
    figures = {"shard": sum(p.numel() * p.element_size() for p in model.parameters())}
    dist.barrier()

    def export() -> None:
        save_hf_directory(model, hf_dir, out, buffer_bytes=buffer_bytes)
        os.sync()

    figures["export"] = _measured(export)

    def directory_sync() -> None:
        stream = export_stream(model, to="rank0", buffer_bytes=buffer_bytes)
        if dist.get_rank() == 0:
            write_weight_directory(
                stream, sync_dir, hf_dir, tied=True, bucket_bytes=GiB, buffer_bytes=buffer_bytes
            )
        else:
            for _ in stream.pieces:
                pass
        dist.barrier()

    if sync_dir:
        figures["sync"] = _measured(directory_sync)
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, figures)
    if dist.get_rank() == 0:
        print("RANKS " + json.dumps(ranks), flush=True)
    destroy_distributed()


def compare(a: str, b: str) -> list[str]:
    """Names of the tensors that differ between two HF directories (or are missing from one)."""
    from megatron_papo.models.weights import HFCheckpoint

    left, right = HFCheckpoint(a), HFCheckpoint(b)
    if left.files.keys() != right.files.keys():
        return sorted(left.files.keys() ^ right.files.keys())
    return [n for n in left.files if not torch.equal(left[n][:], right[n][:])]


def _timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    os.sync()
    return time.monotonic() - start, result.stdout


def _report(layout: str, phase: str, ranks: list[dict], buffer_bytes: int) -> bool:
    ok = True
    print(f"{layout} {phase}: {ranks[0][phase]['seconds']:.1f} s (rank 0)")
    print("  rank  shard_GiB  base_GiB  peak_GiB  peak-base_MiB  bound_GiB  within")
    for r, f in enumerate(ranks):
        m = f[phase]
        bound = m["base"] + buffer_bytes
        within = m["peak"] <= bound
        ok &= within
        print(
            f"  {r:4d}  {f['shard'] / GiB:9.2f}  {m['base'] / GiB:8.2f}  {m['peak'] / GiB:8.2f}  "
            f"{(m['peak'] - m['base']) / 2**20:13.0f}  {bound / GiB:9.2f}  {'yes' if within else 'NO'}"
        )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="scratch directory (about 40 GB for both layouts)")
    parser.add_argument("--layouts", nargs="+", default=["2x2", "1x4"], help="TPxPP layouts")
    parser.add_argument("--buffer-mib", type=int, default=256, help="export buffer per rank")
    parser.add_argument("--smoke", action="store_true", help="a 4-layer cut of the 3B (a quick try)")
    parser.add_argument("--rank", nargs=4, metavar=("CKPT", "HF", "OUT", "SYNC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    buffer_bytes = args.buffer_mib << 20
    if args.rank:
        ckpt, hf, out, sync = args.rank
        export_rank(ckpt, hf, out, sync if sync != "-" else None, buffer_bytes)
        return

    os.makedirs(args.work, exist_ok=True)
    source = os.path.join(args.work, "hf")
    if not os.path.exists(source):
        start = time.monotonic()
        make_random_3b(source, args.smoke)
        print(f"random 3B written in {time.monotonic() - start:.0f} s: {source}")
    files = sorted(f for f in os.listdir(source) if f.endswith(".safetensors"))
    nbytes = sum(os.path.getsize(os.path.join(source, f)) for f in files)
    print(f"{len(files)} safetensors files, {nbytes / GiB:.2f} GiB; buffer {args.buffer_mib} MiB per rank")
    copy = os.path.join(args.work, "cp")
    shutil.rmtree(copy, ignore_errors=True)
    os.makedirs(copy)
    cp_s, _ = _timed(["cp", *[os.path.join(source, f) for f in files], copy])
    shutil.rmtree(copy)
    print(f"cp of the same files + sync: {cp_s:.1f} s")
    ok = True
    for i, layout in enumerate(args.layouts):
        tp, pp = (int(x) for x in layout.split("x"))
        ckpt, out, sync = (os.path.join(args.work, f"{kind}_{layout}") for kind in ("ckpt", "out", "sync"))
        for d in (ckpt, out, sync):
            shutil.rmtree(d, ignore_errors=True)
        convert = [sys.executable, os.path.join(ROOT, "tools/convert_checkpoint.py"), "hf-to-mcore"]
        seconds, _ = _timed([*convert, "--hf-dir", source, "--out", ckpt, "--tp", str(tp), "--pp", str(pp)])
        print(f"{layout} hf-to-mcore: {seconds:.0f} s")
        # the source directory: its config for the model, its tensor names for the sync's check
        rank = [
            __file__,
            "--work",
            args.work,
            "--buffer-mib",
            str(args.buffer_mib),
            "--rank",
            ckpt,
            source,
            out,
        ]
        rank.append(sync if i == 0 else "-")
        torchrun = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={tp * pp}",
        ]
        env = dict(os.environ, BENCH_LAYOUT=layout, OMP_NUM_THREADS="1")
        seconds, stdout = _timed([*torchrun, *rank], env)
        ranks = json.loads(next(line for line in stdout.splitlines() if line.startswith("RANKS "))[6:])
        ok &= _report(layout, "export", ranks, buffer_bytes)
        print(f"  export + sync to disk, whole torchrun (start-up, load, export): {seconds:.0f} s")
        if "sync" in ranks[0]:
            ok &= _report(layout, "sync", ranks, buffer_bytes)
        differing = compare(source, out)
        ok &= not differing
        print(f"  bitwise equal to the source: {not differing} {differing[:3]}")
        for d in (ckpt, out, sync):
            shutil.rmtree(d, ignore_errors=True)
    print("ALL WITHIN BOUND AND BITWISE" if ok else "FAILED")


if __name__ == "__main__":
    main()
