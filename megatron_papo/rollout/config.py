"""The ``rollout`` section: which engine generates responses, and how it samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_papo.config_io import check_choices


@dataclass
class RolloutConfig:
    """Sampling of ``n`` responses per prompt (reference recipe: n=5, T=1.0, top_p=0.99).

    ``backend`` vllm: rollouts from the OpenAI-compatible servers ``vllm_urls`` (tools/launch_vllm.sh).
    ``vllm_weight_sync``: how updated weights reach them: ``directory`` (a safetensors directory the servers
    reload from; needs storage both see) or ``broadcast`` (straight into the servers' workers over NCCL or
    gloo; servers started with ``--weight-sync broadcast``; ``vllm_sync_host``: the address they reach the
    trainer at, default this machine's address on the route to each server). See docs/vllm.md.
    ``embedded_batch_prompts``: prompts the embedded engine generates in one batch (1: each prompt alone,
    its samples independent of the layout; more: faster, see ``rollout.embedded``).
    ``tis_cap``: truncated importance sampling of the policy-gradient term by
    ``min(pi_old / pi_rollout, tis_cap)`` per token (off when None; the embedded engine then reports its
    log-probs too).
    ``max_staleness``: how many policy versions the rollouts of a step may lag behind the weights it trains
    from. 0: generate, then train (the synchronous loop). s > 0: the batches of the next ``s`` steps are
    generated on a background thread while the trainer updates (``training.rollout_producer``), each with the
    weights of at most ``s`` updates ago; the embedded engine reports its log-probs, so the step logs the
    log-prob mismatch and importance weights (and ``tis_cap`` corrects for the lag).
    """

    backend: Literal["embedded", "vllm"] = "embedded"
    n: int = 5
    temperature: float = 1.0
    top_p: float = 0.99
    max_new_tokens: int = 2048
    vllm_urls: list[str] = field(default_factory=list)
    vllm_weight_sync: Literal["directory", "broadcast"] = "directory"
    vllm_sync_host: str | None = None
    tis_cap: float | None = None
    embedded_batch_prompts: int = 1
    max_staleness: int = 0

    def __post_init__(self) -> None:
        check_choices(self, "rollout")
        if self.n < 1:
            raise ValueError(f"rollout.n must be >= 1, got {self.n}")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.embedded_batch_prompts < 1:
            raise ValueError(
                f"rollout.embedded_batch_prompts must be >= 1, got {self.embedded_batch_prompts}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.backend == "vllm" and not self.vllm_urls:
            raise ValueError("rollout.backend is 'vllm' but rollout.vllm_urls is empty")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"rollout.tis_cap must be > 0, got {self.tis_cap}")
        if self.max_staleness < 0:
            raise ValueError(f"rollout.max_staleness must be >= 0, got {self.max_staleness}")

    @property
    def engine_logprobs(self) -> bool:
        """Whether the step needs the engine's log-probs of its samples (importance weights, mismatch)."""
        return self.tis_cap is not None or self.max_staleness > 0
