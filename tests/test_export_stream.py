"""The export's memory bound: the safetensors writer refuses a piece larger than its buffer, and an HF export
of a TP=2 x PP=2 model with a 16 KiB buffer moves no more than that per collective on any rank, pickles
nothing, and writes the source's tensors bitwise."""

import os

import pytest
import torch
from multiprocess import run_distributed
from safetensors.torch import load_file

from megatron_papo.models.safetensors_writer import SafetensorsWriter
from megatron_papo.models.weight_stream import TensorSpec

BUFFER = 16 << 10


def test_writer_places_pieces_in_any_order_and_refuses_more_than_its_buffer(tmp_path):
    a, b = torch.arange(24, dtype=torch.bfloat16).reshape(6, 4), torch.ones(3, dtype=torch.int64)
    specs = [TensorSpec("a", a.dtype, (6, 4)), TensorSpec("b", b.dtype, (3,))]
    with SafetensorsWriter(str(tmp_path), specs, max_shard_bytes=1 << 20, buffer_bytes=16) as writer:
        with pytest.raises(BufferError, match="a piece of 24 bytes exceeds the export buffer of 16"):
            writer.write("b", 0, b)
        writer.write("a", 4, a[4:])
        writer.write("b", 1, b[1:])
        writer.write("a", 0, a[:2])
        with pytest.raises(ValueError, match="2 tensors not written whole"):
            writer.close()
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    with SafetensorsWriter(str(sharded), specs, max_shard_bytes=40, buffer_bytes=16) as writer:
        for row in range(0, 6, 2):
            writer.write("a", row, a[row : row + 2])
        writer.write("b", 0, b[:2])
        writer.write("b", 2, b[2:])
        assert writer.close() == 72
    files = sorted(os.listdir(sharded))
    assert files == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    written = load_file(str(sharded / files[0])) | load_file(str(sharded / files[1]))
    assert torch.equal(written["a"], a) and torch.equal(written["b"], b)


def _export(hf_dir: str, out_dir: str) -> int:
    """Load ``hf_dir`` at this layout and save it to ``out_dir`` with a ``BUFFER`` export; return the most
    bytes any one collective of this rank moved."""
    import torch.distributed as dist

    from megatron_papo.models import ModelConfig, build_model, load_hf_weights, save_hf_directory

    model = build_model(ModelConfig(hf_path=hf_dir))
    load_hf_weights(model, hf_dir)
    moved = [0]

    def recorded(collective):
        def call(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor | list)]
            sizes = [
                t.numel() * t.element_size() for x in tensors for t in (x if isinstance(x, list) else [x])
            ]
            moved[0] = max(moved[0], max(sizes, default=0) if collective != "gather" else sum(sizes))
            return collective_fns[collective](*args, **kwargs)

        return call

    collective_fns = {c: getattr(dist, c) for c in ("send", "recv", "broadcast", "gather", "all_gather")}
    originals = dict(collective_fns, broadcast_object_list=dist.broadcast_object_list)
    try:
        for c in collective_fns:
            setattr(dist, c, recorded(c))
        dist.broadcast_object_list = None  # weights are never pickled
        save_hf_directory(model, hf_dir, out_dir, buffer_bytes=BUFFER)
    finally:
        for c, fn in originals.items():
            setattr(dist, c, fn)
    return moved[0]


def test_tp2_pp2_export_stays_within_its_buffer_and_is_bitwise(tiny_model, tmp_path):
    tiny = tiny_model
    moved = run_distributed(_export, 4, tiny, str(tmp_path / "out"), tp=2, pp=2)
    # half the buffer per collective: two chunks are in flight on a receiving rank (layouts.pieces)
    assert 0 < max(moved) <= BUFFER // 2, moved
    source, exported = (
        load_file(f"{tiny}/model.safetensors"),
        load_file(str(tmp_path / "out/model.safetensors")),
    )
    assert source.keys() == exported.keys()
    assert [k for k in source if not torch.equal(source[k], exported[k])] == []
