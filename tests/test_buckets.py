"""The one bucketing rule of every weight export (``megatron_papo.models.buckets``)."""

import torch

from megatron_papo.models.buckets import buckets, tensor_bytes


def test_buckets_keep_order_bound_their_bytes_and_drop_nothing():
    sizes = [3, 5, 1, 40, 2, 2, 2, 9, 1, 16, 0, 7]  # float32 elements; 40 is over the bound alone
    pairs = [(f"t{i}", torch.zeros(n)) for i, n in enumerate(sizes)]
    bound = 16 * 4
    out = list(buckets(iter(pairs), bound))
    assert [name for bucket in out for name, _ in bucket] == [name for name, _ in pairs]
    assert all(a is b for (_, a), (_, b) in zip([p for bucket in out for p in bucket], pairs, strict=True))
    for bucket in out:
        nbytes = sum(tensor_bytes(t) for _, t in bucket)
        assert bucket and (nbytes <= bound or len(bucket) == 1)
    # each bucket is as full as the next tensor allows (it ends only when that tensor would not fit)
    for bucket, after in zip(out, out[1:], strict=False):
        assert sum(tensor_bytes(t) for _, t in bucket) + tensor_bytes(after[0][1]) > bound
    assert [len(b) for b in out] == [3, 1, 5, 2, 1]  # 16 * 4 bytes exactly fit
    assert list(buckets([], bound)) == []
    assert [len(b) for b in buckets(pairs, 1)] == [1] * len(pairs)
