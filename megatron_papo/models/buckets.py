"""Size-bounded buckets of a stream of (name, tensor) pairs: the one grouping rule of every weight export.

Used by ``safetensors_writer`` (the shards of an HF directory or a vLLM directory sync, from the tensors'
specs on the meta device) and ``rollout.vllm_broadcast`` (one broadcast per bucket).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def tensor_bytes(tensor: torch.Tensor) -> int:
    """The bytes of ``tensor``'s elements."""
    return tensor.numel() * tensor.element_size()


def buckets(
    pairs: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """``pairs`` in order, as consecutive non-empty lists of at most ``bucket_bytes`` bytes each; a tensor
    larger than that is a bucket of its own. Lazy: a bucket is yielded when the next tensor would overflow
    it or the pairs end, so at most one bucket and one tensor are held."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in pairs:
        nbytes = tensor_bytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
