"""Rollout requests as vLLM chat completions, and the answers as rollouts.

Each ``RolloutRequest`` becomes one ``/v1/chat/completions`` request for ``n`` samples: the chat text is
split back into its messages, images travel as base64 PNG data URLs, the sampling parameters are the
``rollout`` section's, the vision tokens get a -100 logit bias (``rollout.engine.vision_token_ids``), and
the server returns the token ids (``return_token_ids``) and per-token log-probs of every sample, so nothing
is re-tokenised. The server's prompt token ids (image pads expanded by its own processor) must equal the
trainer's ``input_ids``: a different tokenizer, chat template or image resolution is an error, not a silent
drift. Anything else unexpected in an answer is a malformed answer (a retryable ``ServerError``).
"""

from __future__ import annotations

import base64
import io
import re

import torch
from PIL import Image

from megatron_papo.rollout.config import RolloutConfig
from megatron_papo.rollout.engine import Rollout, RolloutRequest
from megatron_papo.rollout.vllm_http import ServerError

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
GENERATION_PROMPT = "<|im_start|>assistant\n"
_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n", re.DOTALL)


def image_data_url(image: Image.Image) -> str:
    """``image`` as a base64 PNG data URL (lossless: the server sees the trainer's pixels)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_messages(prompt_text: str, images: list[Image.Image]) -> list[dict]:
    """The OpenAI chat messages of a Qwen chat text (``<|im_start|>role\\n...<|im_end|>\\n`` turns ending
    with the generation prompt); each ``<|vision_start|><|image_pad|><|vision_end|>`` takes the next image."""
    if not prompt_text.endswith(GENERATION_PROMPT):
        raise ValueError(f"prompt text does not end with the generation prompt {GENERATION_PROMPT!r}")
    body = prompt_text[: -len(GENERATION_PROMPT)]
    if body.count(IMAGE) != len(images):
        raise ValueError(f"prompt text has {body.count(IMAGE)} image placeholders for {len(images)} images")
    pending = iter(images)
    messages, pos = [], 0
    for turn in _TURN.finditer(body):
        if turn.start() != pos:
            raise ValueError(f"prompt text has {body[pos : turn.start()]!r} outside chat turns")
        pos = turn.end()
        role, pieces = turn.group(1), turn.group(2).split(IMAGE)
        if len(pieces) == 1:
            messages.append({"role": role, "content": pieces[0]})
            continue
        content: list[dict] = []
        for i, piece in enumerate(pieces):
            if i:
                content.append({"type": "image_url", "image_url": {"url": image_data_url(next(pending))}})
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    if pos != len(body):
        raise ValueError(f"prompt text has {body[pos:]!r} outside chat turns")
    return messages


def completion_body(
    req: RolloutRequest,
    n: int,
    model: str | None,
    rollout: RolloutConfig,
    logit_bias: dict[str, float],
    min_pixels: int | None,
    max_pixels: int | None,
) -> dict:
    """The ``/v1/chat/completions`` body of ``n`` samples of ``req`` from the served ``model``; the pixel
    range (when given) goes to the server's image processor."""
    if req.prompt_text is None or req.images is None:
        raise ValueError("the vLLM rollout engine needs prompt_text and images on every RolloutRequest")
    body = {
        "model": model,
        "messages": chat_messages(req.prompt_text, req.images),
        "n": n,
        "temperature": rollout.temperature,
        "top_p": rollout.top_p,
        "max_tokens": rollout.max_new_tokens,
        "seed": req.seed,
        "logprobs": True,
        "top_logprobs": 0,
        "return_token_ids": True,
        "logit_bias": logit_bias,
    }
    pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    if any(v is not None for v in pixels.values()):
        body["mm_processor_kwargs"] = {k: v for k, v in pixels.items() if v is not None}
    return body


def parse_completion(answer: dict, req: RolloutRequest, n: int, url: str, vocab_size: int) -> list[Rollout]:
    """The ``n`` rollouts of the server at ``url``'s chat completion ``answer`` to ``req``; anything
    unexpected is a malformed answer (``ServerError``), a prompt tokenised differently a ``ValueError``."""

    def malformed(what: str) -> ServerError:
        return ServerError(url, f"malformed chat completion answer: {what}")

    prompt_ids = answer.get("prompt_token_ids")
    if not isinstance(prompt_ids, list):
        raise malformed("no prompt_token_ids list (the server must support return_token_ids)")
    expected = req.input_ids.tolist()
    if prompt_ids != expected:
        at = next((i for i, (a, b) in enumerate(zip(prompt_ids, expected, strict=False)) if a != b), None)
        at = min(len(prompt_ids), len(expected)) if at is None else at
        raise ValueError(
            f"vLLM server {url} tokenised the prompt (seed {req.seed}) differently from the "
            f"trainer: "
            f"{len(prompt_ids)} vs {len(expected)} tokens, first difference at position {at} "
            f"(server {prompt_ids[at : at + 5]}, trainer {expected[at : at + 5]}); do the server's "
            "tokenizer, chat template and image pixel range match the trainer's?"
        )
    choices = answer.get("choices")
    if not isinstance(choices, list) or len(choices) != n:
        raise malformed(f"expected {n} choices, got {type(choices).__name__} {str(choices)[:100]}")
    rollouts = []
    try:
        for choice in sorted(choices, key=lambda c: c["index"]):
            ids = choice["token_ids"]
            lps = [float(t["logprob"]) for t in choice["logprobs"]["content"]]
            finish = choice["finish_reason"]
            if not ids or len(ids) != len(lps):
                raise malformed(f"{len(ids)} token ids with {len(lps)} log-probs")
            if not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
                raise malformed(f"token ids outside [0, {vocab_size}): {ids[:10]}")
            if finish not in ("stop", "length"):
                raise malformed(f"finish_reason {finish!r}")
            rollouts.append(
                Rollout(
                    response_ids=torch.tensor(ids, dtype=torch.int64),
                    finished=finish == "stop",
                    logprobs=torch.tensor(lps, dtype=torch.float32),
                )
            )
    except (KeyError, TypeError, ValueError) as e:
        raise malformed(f"{type(e).__name__}: {e}") from e
    return rollouts
