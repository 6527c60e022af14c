"""Fused vocab-parallel ops: log-probs, entropies and KLs over tensor-parallel vocabulary shards."""

from megatron_papo.ops.vocab_parallel import (
    NonFiniteError,
    full_kl,
    kl_estimate,
    log_probs_and_entropy,
    log_probs_entropies_and_kl,
)

__all__ = ["NonFiniteError", "full_kl", "kl_estimate", "log_probs_and_entropy", "log_probs_entropies_and_kl"]
