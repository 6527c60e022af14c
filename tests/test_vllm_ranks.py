"""Every trainer rank knows which vLLM servers hold the current weights: two real trainer ranks (gloo) and
two stand-in servers (local HTTP servers that keep a weight version and record their reloads), one of them
restarted between syncs. No vLLM needed."""

import http.server
import json
import threading
import urllib.request

import pytest
import torch.distributed as dist
from multiprocess import run_distributed
from test_vllm import initial_weights

from megatron_papo.rollout.vllm import VllmConfig
from megatron_papo.rollout.vllm_http import ServerError, VllmServer
from megatron_papo.rollout.vllm_servers import ServerPool
from megatron_papo.rollout.vllm_weights import ServerWeights


class _Handler(http.server.BaseHTTPRequestHandler):
    """A vLLM server as weight sync sees it: ``/weight_info`` reports ``version``, ``/collective_rpc``
    reloads (recorded in ``reloads``: the ``weights_path`` sent), ``/update_weight_version`` sets it.
    ``POST /_restart`` (the test's) brings it back as a fresh process: base weights, no version;
    ``POST /_status`` sets the status every call answers (503: restarting)."""

    def do_GET(self):
        state = self.server.state
        self._reply(state["status"], {"weight_version": state["version"]})

    def do_POST(self):
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        if self.path == "/_restart":
            state["version"] = None
        elif self.path == "/_status":
            state["status"] = body["status"]
        elif state["status"] != 200:
            return self._reply(state["status"], {})
        elif self.path == "/collective_rpc":
            state["reloads"].append(body["kwargs"]["weights_path"])
        elif self.path == "/update_weight_version":
            state["version"] = body["new_version"]
        self._reply(200, {})

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _serve() -> tuple[http.server.ThreadingHTTPServer, str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = {"version": None, "status": 200, "reloads": []}
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def _post(url: str, path: str, body: dict) -> None:
    request = urllib.request.Request(url + path, json.dumps(body).encode(), method="POST")
    urllib.request.urlopen(request, timeout=10).read()


def _syncs_with_a_restart(urls: list[str], sync_dir: str, model: str) -> dict:
    """On each rank: sync; server 1 restarts and rank 1 revives it; sync again while server 1 is
    restarting (it misses the sync). Returns what this rank saw."""
    rank = dist.get_rank()
    weights = ServerWeights(VllmConfig(urls, sync_dir, retry_down_after_s=0.0), model, tied=True)
    pool = ServerPool(urls, 5.0, 0.0, weights.refresh)
    weights.sync(initial_weights(model).items(), pool.servers, start=lambda: None)
    if rank == 0:
        _post(urls[1], "/_restart", {})
    dist.barrier()
    if rank == 1:  # a request to the restarting server failed; the next one revives it
        pool.failed(pool.servers[1], "connection reset")
        assert pool.acquire({urls[0]}) is pool.servers[1]
    dist.barrier()
    if rank == 0:
        _post(urls[1], "/_status", {"status": 503})
    dist.barrier()
    weights.sync(initial_weights(model).items(), pool.servers, start=lambda: None)
    return {"down": [s.down for s in pool.servers], "error": pool.servers[1].last_error}


def test_a_server_restarted_between_syncs_is_reloaded_or_left_out_on_every_rank(tiny_model, tmp_path):
    """Rank 1 revives a restarted server with rank 0's synced directory (it used to reload the base
    checkpoint and mark it current); a server that missed a sync is out of use on rank 1 too."""
    servers = [_serve() for _ in range(2)]
    try:
        urls = [url for _, url in servers]
        seen = run_distributed(_syncs_with_a_restart, 2, urls, str(tmp_path / "sync"), tiny_model)
        reloads = [httpd.state["reloads"] for httpd, _ in servers]
    finally:
        for httpd, _ in servers:
            httpd.shutdown()
            httpd.server_close()
    v1, v2 = str(tmp_path / "sync" / "v1"), str(tmp_path / "sync" / "v2")
    assert reloads == [[v1, v2], [v1, v1]]  # server 1: sync 1, then rank 1's revival; none without a path
    assert [rank["down"] for rank in seen] == [[False, True], [False, True]]
    assert "HTTP 503" in seen[0]["error"] and "missed the sync of" in seen[1]["error"]


def test_no_reload_goes_out_without_a_weights_path(tmp_path):
    """A rank that knows of a sync but not its directory refuses to reload (vLLM would reload the
    checkpoint the server started from) and leaves the server out of use."""
    httpd, url = _serve()
    try:
        weights = ServerWeights(VllmConfig([url], str(tmp_path)), "unused", tied=True)
        weights.number = 1
        with pytest.raises(ServerError, match="no weights directory is known"):
            weights.refresh(VllmServer(url))
        assert httpd.state["reloads"] == []
    finally:
        httpd.shutdown()
        httpd.server_close()
