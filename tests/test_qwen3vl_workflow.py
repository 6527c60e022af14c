"""A Qwen3-VL policy through the CPU workflow as a user runs it, in one launch: ``megatron-papo sft`` (its
HF export), ``megatron-papo eval`` of that export, then ``megatron-papo train`` (PAPO-G) from it with an
evaluation at its last step. The model's exactness (logits, conversion, vLLM) is tested elsewhere
(test_model_qwen3vl.py, test_convert_qwen3vl.py, test_vllm.py); this checks that the commands accept a
Qwen3-VL directory and hand each other working weights."""

import json
import math

import torch
from main_job import cli_in_one_launch, train_args
from safetensors.torch import load_file
from transformers import AutoConfig, Qwen3VLForConditionalGeneration

from megatron_papo.models.tiny import make_tiny_qwen3vl
from megatron_papo.models.weights import module_name


def test_sft_eval_and_train_a_qwen3vl_policy(tmp_path):
    start = make_tiny_qwen3vl(str(tmp_path / "tiny"))
    sft_hf = str(tmp_path / "sft" / "hf")
    eval_out = tmp_path / "eval.json"
    runs = {
        "sft": ["sft", *train_args(tmp_path / "sft", start, ["trainer.steps=2", "optimizer.lr=1e-3"])[1:]],
        "eval": [
            "eval",
            *train_args(tmp_path / "eval", sft_hf, ["eval.max_prompts=2"])[1:],
            "--output",
            str(eval_out),
        ],
        "train": train_args(
            tmp_path / "train", sft_hf, ["trainer.steps=2", "eval.interval=2", "eval.max_prompts=2"]
        ),
    }
    results = cli_in_one_launch(tmp_path, runs)
    for name, (_, finished) in results.items():
        assert finished.returncode == 0, (name, finished.stdout[-2000:], finished.stderr[-4000:])

    sft_rows = results["sft"][0]
    assert [r["step"] for r in sft_rows] == [1, 2] and all(math.isfinite(r["actor/loss"]) for r in sft_rows)
    assert AutoConfig.from_pretrained(sft_hf).model_type == "qwen3_vl"
    exported = Qwen3VLForConditionalGeneration.from_pretrained(sft_hf).state_dict()
    initial = load_file(f"{start}/model.safetensors")
    fresh = Qwen3VLForConditionalGeneration(AutoConfig.from_pretrained(start)).state_dict()
    assert exported.keys() == fresh.keys()
    moved = [name for name, v in initial.items() if not torch.equal(exported[module_name(name)], v)]
    assert moved, "SFT's export holds the start's weights"

    ev = json.loads(eval_out.read_text())
    assert ev["eval/prompts"] == 2 and ev["step"] == 0
    for key in ("eval/accuracy", "eval/masked_accuracy", "eval/format"):
        assert 0.0 <= ev[key] <= 1.0

    rl_rows = results["train"][0]
    assert [r["step"] for r in rl_rows] == [1, 2] and "eval/accuracy" not in rl_rows[0]
    assert rl_rows[1]["eval/prompts"] == 2 and 0.0 <= rl_rows[1]["eval/accuracy"] <= 1.0
    assert all(math.isfinite(r["papo/kl_prc"]) and math.isfinite(r["actor/loss"]) for r in rl_rows)
