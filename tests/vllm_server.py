"""Real vLLM servers for tests (``megatron_papo.rollout.vllm_process``), all with the session's weight-sync
token ``SYNC_TOKEN``.

The venv of tools/setup_vllm_env.sh is found at ``$MEGATRON_PAPO_VLLM_VENV`` (default
``~/.cache/megatron-papo/vllm-venv``); tests skip with the reason when it is absent or incomplete.
"""

from __future__ import annotations

import functools
import os

import pytest

from megatron_papo.parallel.ports import free_port
from megatron_papo.rollout.sync_auth import new_token
from megatron_papo.rollout.vllm_process import ROOT, VLLM_VENV, LocalVllmServer

__all__ = ["ROOT", "SYNC_TOKEN", "VllmServerProcess", "free_port", "requires_vllm"]

COMPLETE = os.path.join(VLLM_VENV, ".megatron-papo-vllm-complete")
SYNC_TOKEN = new_token()
VllmServerProcess = functools.partial(LocalVllmServer, token=SYNC_TOKEN)

requires_vllm = pytest.mark.skipif(
    not os.path.exists(COMPLETE),
    reason=f"no vLLM venv at {VLLM_VENV} (create it with `bash tools/setup_vllm_env.sh`)",
)
