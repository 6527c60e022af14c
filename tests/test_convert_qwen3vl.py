"""tools/convert_checkpoint.py on Qwen3-VL: HF -> megatron saved at TP=2 x PP=2 -> HF loaded at TP=1 and at
PP=2 is bitwise, with exactly the keys of transformers' ``Qwen3VLForConditionalGeneration.state_dict()``
(Qwen3-VL checkpoint files use those names) and the source's non-weight files; transformers loads it.
The vLLM directory sync writes the same names."""

import filecmp
import os

import pytest
import torch
from test_checkpoint_convert import _tensors, forked_ranks  # noqa: F401 (autouse: ranks from the fork server)
from test_checkpoint_convert import main as convert_main
from test_model_qwen3vl import jittered_tiny_qwen3vl


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[str, str]:
    """(the tiny untied Qwen3-VL, its megatron checkpoint saved at TP=2 x PP=2)."""
    root = tmp_path_factory.mktemp("convert_qwen3vl")
    tiny = jittered_tiny_qwen3vl(str(root / "tiny"), tie_word_embeddings=False)
    convert_main(["hf-to-mcore", "--hf-dir", tiny, "--out", str(root / "ckpt"), "--tp", "2", "--pp", "2"])
    return tiny, str(root / "ckpt")


@pytest.mark.parametrize("layout", [("1", "1"), ("1", "2")], ids=["tp1", "pp2"])
def test_round_trip_resharded_is_bitwise(converted, layout, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    tiny, ckpt = converted
    out = str(tmp_path / "hf")
    convert_main(["mcore-to-hf", "--ckpt", ckpt, "--out", out, "--tp", layout[0], "--pp", layout[1]])
    assert sorted(os.listdir(out)) == sorted(os.listdir(tiny))
    source, exported = _tensors(tiny), _tensors(out)
    model, info = Qwen3VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert set(exported) == set(model.state_dict()) == set(source)
    assert [k for k in source if not torch.equal(source[k], exported[k])] == []
    others = [f for f in os.listdir(tiny) if not f.endswith(".safetensors")]
    assert sorted(filecmp.cmpfiles(tiny, out, others, shallow=False)[0]) == sorted(others)


def test_vllm_directory_sync_keeps_the_state_dict_names(tmp_path):
    from megatron_papo.rollout.vllm_sync import write_weight_directory

    tiny = jittered_tiny_qwen3vl(str(tmp_path / "tiny"), tie_word_embeddings=False)
    source, out = _tensors(tiny), str(tmp_path / "sync")
    write_weight_directory(source.items(), out, tiny, tied=False, bucket_bytes=1 << 30)
    exported = _tensors(out)
    assert set(exported) == set(source)
    assert [k for k in source if not torch.equal(source[k], exported[k])] == []
