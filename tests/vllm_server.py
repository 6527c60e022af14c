"""Real vLLM servers for tests: started with tools/launch_vllm.sh from the venv of tools/setup_vllm_env.sh.

The venv is found at ``$MEGATRON_PAPO_VLLM_VENV`` (default ``~/.cache/megatron-papo/vllm-venv``); tests
skip with the reason when it is absent or incomplete. Each server runs in its own process group, so a
test can kill it (API server, engine core and worker) at once, as a crash would. Servers take the
session's weight-sync token ``SYNC_TOKEN`` and this checkout's megatron-papo (its plugin and middleware),
whichever checkout the venv was built from.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time

import pytest

from megatron_papo.rollout.sync_auth import ENV, new_token
from megatron_papo.rollout.vllm_http import VllmServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.environ.get("MEGATRON_PAPO_VLLM_VENV", os.path.expanduser("~/.cache/megatron-papo/vllm-venv"))
COMPLETE = os.path.join(VENV, ".megatron-papo-vllm-complete")
SYNC_TOKEN = new_token()

requires_vllm = pytest.mark.skipif(
    not os.path.exists(COMPLETE),
    reason=f"no vLLM venv at {VENV} (create it with `bash tools/setup_vllm_env.sh`)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServerProcess:
    """``tools/launch_vllm.sh`` serving ``model_dir`` on a free local port, float32, eager, small; its
    compute threads on the ``core``-th CPU core this process may use (vLLM's default puts every server
    on core 0). ``weight_sync``: tools/launch_vllm.sh's ``--weight-sync``. ``port``: a given one (a
    restart of a killed server), else a free one."""

    def __init__(
        self,
        model_dir: str,
        log_path: str,
        core: int = 0,
        max_model_len: int = 1024,
        weight_sync: str = "directory",
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cores = sorted(os.sched_getaffinity(0))
        env = os.environ | {
            "VLLM_PYTHON": os.path.join(VENV, "bin", "python"),
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": str(cores[core % len(cores)]),
            ENV: SYNC_TOKEN,
            "PYTHONPATH": ROOT,
        }
        args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_model_len)]
        args += ["--max-num-seqs", "16", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--weight-sync", weight_sync]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["bash", os.path.join(ROOT, "tools", "launch_vllm.sh"), "--model", model_dir, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def wait_up(self, deadline: float) -> None:
        """Block until the server answers ``/health``; fail the test if it exits or ``deadline``
        (``time.monotonic()``) passes first."""
        while not VllmServer(self.url).healthy(timeout=5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vLLM server {self.url} did not come up:\n{self.log_tail()}")
            time.sleep(2)

    def log_tail(self, chars: int = 3000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def kill(self) -> None:
        """SIGKILL the server's whole process group (as a crash would) and reap it."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM the process group; SIGKILL what is left 20 s later (or at once after the leader exits)."""
        if self._signal_group(signal.SIGTERM):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        self.kill()

    def _signal_group(self, sig: signal.Signals) -> bool:
        """Send ``sig`` to the server's process group; False when no process of it is left."""
        try:
            os.killpg(self.proc.pid, sig)
            return True
        except ProcessLookupError:
            return False
