"""The embedded rollout engine: prompts generated in one left-padded batch give the responses each prompt
gets alone (``rollout.embedded_batch_prompts``), with images of different sizes and a text-only prompt.

Sampling is made deterministic by ``top_p`` so small that only the most likely token survives: the batch
then must reproduce every prompt's own greedy continuation, token for token, and return them grouped per
request in order.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from data_helpers import data_config, random_image
from safetensors.torch import load_file
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from megatron_papo.data.encode import chat_text, encode_prompt
from megatron_papo.data.records import PromptSample
from megatron_papo.models.tiny import make_tiny_qwen25vl
from megatron_papo.rollout.config import RolloutConfig
from megatron_papo.rollout.embedded import EmbeddedEngine
from megatron_papo.rollout.engine import RolloutRequest

N = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny"))
    make_tiny_qwen25vl(path)
    return path


def _requests(model_dir: str) -> list[RolloutRequest]:
    """Four prompts encoded as the trainer encodes them: different lengths, image sizes and counts."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    prompts = [
        ("how many circles are there", [random_image((56, 56), 1)]),
        ("what color is the largest shape in the image", [random_image((84, 56), 2)]),
        ("the sum of the digits", []),  # text only
        ("which shape is left", [random_image((56, 84), 3), random_image((56, 56), 4)]),
    ]
    requests = []
    for i, (text, images) in enumerate(prompts):
        sample = PromptSample(f"u{i}", f"k{i}", "memory", text, "1", "number", "test", images, [])
        if images:
            encoded = encode_prompt(sample, tokenizer, processor, data_config())
            request = RolloutRequest(encoded.input_ids, encoded.pixel_values, encoded.image_grid_thw, 100 + i)
        else:
            text = chat_text(sample, tokenizer, data_config())
            ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
            request = RolloutRequest(ids, None, None, 100 + i)
        requests.append(request)
    assert len({len(r.input_ids) for r in requests}) == len(requests)  # every prompt is padded differently
    return requests


def _engine(model_dir: str, batch_prompts: int) -> EmbeddedEngine:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = RolloutConfig(n=N, top_p=1e-6, max_new_tokens=10, embedded_batch_prompts=batch_prompts)
    engine = EmbeddedEngine(model_dir, cfg, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # weights far from their small init, so that the greedy continuation depends on the prompt
    g = torch.Generator().manual_seed(0)
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    engine.sync_weights((k, w + 0.3 * torch.randn(w.shape, generator=g)) for k, w in weights.items())
    return engine


def test_batched_prompts_give_each_prompt_its_own_responses(model_dir):
    requests = _requests(model_dir)
    alone = _engine(model_dir, 1).generate(requests, N)
    batched = _engine(model_dir, 3).generate(requests, N)  # a batch of 3 prompts, then 1
    assert [len(g) for g in batched] == [N] * len(requests)
    for i, (ours, theirs) in enumerate(zip(batched, alone, strict=True)):
        for a, b in zip(ours, theirs, strict=True):
            assert a.finished == b.finished and torch.equal(a.response_ids, b.response_ids), f"prompt {i}"
    # the prompts do not all answer alike: a mix-up of rows between requests would show
    assert len({tuple(g[0].response_ids.tolist()) for g in alone}) > 1


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="embedded_batch_prompts must be >= 1"):
        RolloutConfig(embedded_batch_prompts=0)


def test_log_probs_are_those_of_the_sampling_distribution_and_leave_the_samples_alone(model_dir):
    """``rollout.max_staleness`` > 0 (or ``tis_cap``): each token's log-prob under ``softmax(logits / T)``
    without the suppressed vision tokens (top_p 1), as a full forward of the same weights gives it; the
    tokens are those sampled without log-probs."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    weights = {k: w + 0.3 * torch.randn(w.shape, generator=g) for k, w in weights.items()}
    engines = []
    for staleness in (0, 1):
        cfg = RolloutConfig(n=N, temperature=0.7, top_p=1.0, max_new_tokens=6, max_staleness=staleness)
        engine = EmbeddedEngine(model_dir, cfg, tokenizer.eos_token_id, tokenizer.pad_token_id)
        engine.sync_weights(weights.items())
        engine.weight_version = 7
        engines.append(engine)
    request = _requests(model_dir)[2]  # text only
    plain, scored = (e.generate([request], N)[0] for e in engines)
    model = engines[1].model
    for a, b in zip(plain, scored, strict=True):
        assert a.logprobs is None and b.logprobs is not None and b.weight_version == 7
        assert torch.equal(a.response_ids, b.response_ids)
        ids = torch.cat([request.input_ids, b.response_ids])[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(request.input_ids) - 1 : -1] / 0.7
        logits[:, engines[1].vision_token_ids] = -math.inf
        want = logits.log_softmax(-1).gather(1, b.response_ids[:, None]).squeeze(1)
        assert b.logprobs.shape == b.response_ids.shape
        torch.testing.assert_close(b.logprobs, want, atol=1e-4, rtol=1e-4)  # KV cache vs one forward
