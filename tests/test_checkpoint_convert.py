"""tools/convert_checkpoint.py: HF -> megatron (TP=2 x PP=2) -> HF (TP=1 x PP=2) is bitwise, file names and
non-weight files included, and transformers loads the result; bad input fails before anything is written."""

import filecmp
import json
import os
import shutil
import sys

import pytest
import torch
from multiprocess import START_METHOD
from safetensors import safe_open

from megatron_papo.models import conversion
from megatron_papo.models.hf_directory import write_safetensors
from megatron_papo.models.tiny import make_tiny_qwen25vl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from convert_checkpoint import main  # noqa: E402


def _tensors(path: str) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.fixture(autouse=True)
def forked_ranks(monkeypatch) -> None:
    """The conversion's ranks start from the session's fork server (tests/multiprocess.py), not spawned."""
    monkeypatch.setattr(conversion, "START_METHOD", START_METHOD)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_qwen25vl(str(tmp_path_factory.mktemp("convert") / "tiny"))


def test_round_trip_through_a_megatron_checkpoint_is_bitwise(tiny, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    main(["hf-to-mcore", "--hf-dir", tiny, "--out", ckpt, "--tp", "2", "--pp", "2"])
    main(["mcore-to-hf", "--ckpt", ckpt, "--out", out, "--tp", "1", "--pp", "2"])
    assert sorted(os.listdir(out)) == sorted(os.listdir(tiny))
    assert not os.path.exists(ckpt + ".tmp") and not os.path.exists(out + ".tmp")
    source, exported = _tensors(tiny), _tensors(out)
    assert source.keys() == exported.keys()
    assert [k for k in source if not torch.equal(source[k], exported[k])] == []
    others = [f for f in os.listdir(tiny) if not f.endswith(".safetensors")]
    assert sorted(filecmp.cmpfiles(tiny, out, others, shallow=False)[0]) == sorted(others)
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    # a checkpoint that does not fit the given config fails in the workers and leaves no output behind
    untied = make_tiny_qwen25vl(str(tmp_path / "untied_config"))
    with open(os.path.join(untied, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False
    with open(os.path.join(untied, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    failed = str(tmp_path / "failed")
    with pytest.raises(SystemExit, match="has no .*output_layer"):
        main(["mcore-to-hf", "--ckpt", ckpt, "--hf-dir", untied, "--out", failed])
    assert not os.path.exists(failed) and not os.path.exists(failed + ".tmp")


def test_bad_input_is_named_and_nothing_is_written(tiny, tmp_path):
    out = str(tmp_path / "out")

    def refused(args: list[str], message: str) -> None:
        with pytest.raises(SystemExit, match=message):
            main(args)
        assert not os.path.exists(out) and not os.path.exists(out + ".tmp")

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    refused(["hf-to-mcore", "--hf-dir", str(llama), "--out", out], "holds a 'llama' model")

    sharded = str(tmp_path / "sharded")
    shutil.copytree(tiny, sharded)
    os.remove(os.path.join(sharded, "model.safetensors"))
    write_safetensors(_tensors(tiny), sharded, max_shard_bytes=1 << 20)
    shards = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(shards) > 1
    os.remove(os.path.join(sharded, shards[-1]))
    refused(["hf-to-mcore", "--hf-dir", sharded, "--out", out], f"missing: \\['{shards[-1]}'\\]")

    refused(
        ["hf-to-mcore", "--hf-dir", tiny, "--out", out, "--tp", "4"], "does not divide the model's 2 KV heads"
    )
    refused(["hf-to-mcore", "--hf-dir", tiny, "--out", out, "--pp", "3"], "does not divide 2 layers")
    refused(["mcore-to-hf", "--ckpt", tiny, "--out", out], "is not a megatron-core distributed checkpoint")
    os.makedirs(out)
    with pytest.raises(SystemExit, match="already exists"):
        main(["hf-to-mcore", "--hf-dir", tiny, "--out", out])
    assert os.listdir(out) == []
