"""What listens where and who may push weights (docs/security.md), without vLLM: the servers' token
middleware, the launch script's defaults, the broadcast store's address, the trainer's token, and the
setup script that deletes only what it created. The real servers' refusals: tests/test_vllm_security.py."""

import asyncio
import http.server
import json
import os
import socket
import subprocess
import threading

import pytest
from vllm_server import ROOT

from megatron_papo.config import load_train_config
from megatron_papo.rollout.sync_auth import ENV, HEADER, SyncTokenMiddleware, check_token, new_token
from megatron_papo.rollout.vllm import VllmEngine
from megatron_papo.rollout.vllm_broadcast import BroadcastSync
from megatron_papo.rollout.vllm_http import VllmServer
from megatron_papo.rollout.weight_group import BACKEND, open_group

TOKEN = new_token()


def _call(method: str, path: str, token: str | None) -> tuple[int, bool]:
    """(status, whether the app behind the middleware was reached) of one ASGI call."""
    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message):
        sent.append(message)

    headers = [(HEADER.lower().encode(), token.encode())] if token is not None else []
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    asyncio.run(SyncTokenMiddleware(app)(scope, None, send))
    return sent[0]["status"], bool(reached)


@pytest.mark.parametrize(
    "path", ["/collective_rpc", "/init_weight_transfer_engine", "/update_weights", "/start_weight_update"]
)
def test_weight_sync_calls_need_the_run_token(monkeypatch, path):
    monkeypatch.setenv(ENV, TOKEN)
    assert _call("POST", path, None) == (401, False)
    assert _call("POST", path, "wrong") == (401, False)
    assert _call("POST", path, TOKEN) == (200, True)
    for open_call in (("GET", "/health"), ("GET", "/weight_info"), ("POST", "/v1/chat/completions")):
        assert _call(*open_call, None) == (200, True)  # reads and the OpenAI API stay open
    monkeypatch.delenv(ENV)
    assert _call("POST", path, "") == (401, False)  # a server without a token refuses every sync


def test_the_plugin_check_refuses_a_missing_or_wrong_token(monkeypatch):
    monkeypatch.setenv(ENV, TOKEN)
    check_token(TOKEN, "update_weights")
    for given in ("", None, TOKEN[:-1]):
        with pytest.raises(
            PermissionError, match="update_weights refused: MEGATRON_PAPO_SYNC_TOKEN token wrong"
        ):
            check_token(given, "update_weights")
    monkeypatch.delenv(ENV)
    with pytest.raises(PermissionError, match="no token configured on this server"):
        check_token("", "init_weight_transfer_engine")


def test_the_trainer_needs_the_token_and_sends_it(monkeypatch, tmp_path):
    cfg = load_train_config(None, ["rollout.backend=vllm", "rollout.vllm_urls=[http://127.0.0.1:9]"])
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ValueError, match="MEGATRON_PAPO_SYNC_TOKEN is not set"):
        VllmEngine.from_config(cfg)
    assert (
        VllmServer("http://x", TOKEN).headers[HEADER] == TOKEN
        and HEADER not in VllmServer("http://x").headers
    )


def _fake_launch(tmp_path, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    """tools/launch_vllm.sh with a 'python' that prints the arguments it was given."""
    (tmp_path / "config.json").write_text("{}")
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\necho "$@"\n')
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != ENV} | {"VLLM_PYTHON": str(python)}
    env |= {ENV: token} if token else {}
    script = os.path.join(ROOT, "tools", "launch_vllm.sh")
    return subprocess.run(
        ["bash", script, "--model", str(tmp_path), *args], capture_output=True, text=True, env=env
    )


def test_launch_script_binds_localhost_adds_the_middleware_and_needs_a_token(tmp_path):
    default = _fake_launch(tmp_path)
    assert default.returncode == 0, default.stderr
    assert "--host 127.0.0.1 " in default.stdout and TOKEN not in default.stdout  # the token stays in the env
    assert "--middleware megatron_papo.rollout.sync_auth.SyncTokenMiddleware" in default.stdout
    assert "--host 10.1.2.3 " in _fake_launch(tmp_path, "--host", "10.1.2.3").stdout
    refused = _fake_launch(tmp_path, token=None)
    assert refused.returncode == 2 and "MEGATRON_PAPO_SYNC_TOKEN is not set" in refused.stderr


class _OneWorkerServer(http.server.BaseHTTPRequestHandler):
    """A vLLM server with one worker as broadcast sync's join sees it: on init it records the init info,
    tries the trainer's store from another local address, then joins the group as rank 1."""

    def do_GET(self):
        parallel = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "data_parallel_size": 1}
        config = {"weight_transfer_config": {"backend": BACKEND}, "parallel_config": parallel}
        self._reply({"vllm_config": config})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/init_weight_transfer_engine":
            info = body["init_info"]
            self.server.seen.update(info=info, header=self.headers.get(HEADER))
            with socket.socket() as probe:  # the trainer's store, from an address it does not advertise
                self.server.seen["elsewhere"] = probe.connect_ex(("127.0.0.2", info["master_port"]))
            self.server.group = open_group(info["master_address"], info["master_port"], 1, 2, "gloo", 30)
        self._reply({})

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.timeout(120)
def test_broadcast_store_listens_only_on_the_advertised_address_and_init_carries_the_token():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OneWorkerServer)
    httpd.seen = {}
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        sync = BroadcastSync("gloo", "127.0.0.1", 30.0, 30.0, TOKEN)
        sync.join(VllmServer(f"http://127.0.0.1:{httpd.server_address[1]}", TOKEN))
    finally:
        httpd.shutdown()
        httpd.server_close()
    seen = httpd.seen
    assert seen["info"]["master_address"] == "127.0.0.1" and seen["elsewhere"] != 0  # refused there
    assert seen["info"]["token"] == TOKEN and seen["header"] == TOKEN


def _setup(venv, python: str = "false") -> subprocess.CompletedProcess:
    """tools/setup_vllm_env.sh VENV with a python that fails at once (no venv is ever built here)."""
    script = os.path.join(ROOT, "tools", "setup_vllm_env.sh")
    env = os.environ | {"PYTHON": python}
    return subprocess.run(["bash", script, str(venv)], capture_output=True, text=True, env=env, timeout=60)


def test_setup_script_deletes_only_a_venv_it_created(tmp_path):
    precious = tmp_path / "home"
    (precious / "notes").mkdir(parents=True)
    (precious / "notes" / "thesis.tex").write_text("years of work")
    refused = _setup(precious)
    assert refused.returncode == 2 and "is not a venv this script created" in refused.stderr
    assert (precious / "notes" / "thesis.tex").read_text() == "years of work"

    partial = tmp_path / "venv"  # an interrupted run of the script: its marker, no completion marker
    partial.mkdir()
    for name in ("pyvenv.cfg", ".megatron-papo-vllm-venv", "half-installed"):
        (partial / name).write_text("")
    redone = _setup(partial)
    assert "removing incomplete vLLM venv" in redone.stdout and not (partial / "half-installed").exists()


def test_dockerignore_keeps_runs_checkpoints_and_git_out_of_the_image():
    patterns = set(open(os.path.join(ROOT, ".dockerignore")).read().split())
    assert {".git", "runs", "**/checkpoints", "**/vllm_weights", "wandb", "mlruns", "*.env"} <= patterns
