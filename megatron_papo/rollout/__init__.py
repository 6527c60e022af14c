"""Rollout engines (embedded transformers, vLLM servers) and the weight sync into them."""
