"""Pieces of the training loop: optimizer, checkpoints, metrics, run health."""
