"""A ``PromptSample`` -> the model's inputs: chat prompt, Qwen2-VL image patches, expanded image pads.

Matches ``transformers.Qwen2_5_VLProcessor.__call__`` (which cannot be built here: its video processor
needs torchvision): the images go through the model's own Qwen2-VL image processor (resize to multiples
of patch*merge within [min_pixels, max_pixels], rescale, normalise, patchify), and the i-th
``<|image_pad|>`` of the chat text becomes ``prod(image_grid_thw[i]) // merge_size**2`` copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from megatron_papo.data.config import DataConfig
from megatron_papo.data.records import BadSampleError, PromptSample

IMAGE_PAD = "<|image_pad|>"


@dataclass
class EncodedPrompt:
    """One prompt ready for rollout and training.

    ``prompt_text``: the chat text with one ``<|image_pad|>`` per image (what vLLM takes with the images);
    ``input_ids`` [L] int64: the same text tokenised with each pad expanded to its image's tokens;
    ``pixel_values`` [n_patches, 3*2*14*14] float32 and ``image_grid_thw`` [n_images, 3] int64: the
    preprocessed images; ``images``: the RGB images before preprocessing (raw-grid masking works on them).
    ``epoch`` / ``position``: where the reader found it (position within the rank's epoch order).
    """

    uid: str
    key: str
    shard: str
    prompt_text: str
    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    answer: str
    answer_type: str
    source: str
    images: list[Image.Image]
    masked_images: list[Image.Image] = field(default_factory=list)
    vision_dependent: bool | None = None
    solution: str | None = None
    extra: dict = field(default_factory=dict)
    epoch: int = 0
    position: int = 0


def preprocess_images(
    images: list[Image.Image], image_processor, min_pixels: int, max_pixels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [n_patches, C*T*P*P] float32, image_grid_thw [n_images, 3] int64) via the processor."""
    out = image_processor(
        images=images,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        return_tensors="pt",
    )
    return out["pixel_values"].to(torch.float32), out["image_grid_thw"].to(torch.int64)


def chat_text(sample: PromptSample, tokenizer, cfg: DataConfig) -> str:
    """The templated chat prompt (generation prompt appended) with one image pad per image."""
    question = cfg.question_template.replace("{question}", sample.prompt.strip())
    pieces = question.split(cfg.image_placeholder)
    n_images = len(sample.images)
    if len(pieces) == 1:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    elif len(pieces) - 1 == n_images:
        content = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
        for piece in pieces[1:]:
            content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
    else:
        raise BadSampleError(
            sample.shard,
            sample.key,
            f"the prompt has {len(pieces) - 1} {cfg.image_placeholder!r} markers for {n_images} images",
        )
    messages = [{"role": "user", "content": content}]
    if cfg.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def expand_image_pads(
    text: str, image_grid_thw: torch.Tensor, merge_size: int, image_pad: str = IMAGE_PAD
) -> str:
    """Replace the i-th ``image_pad`` with ``prod(image_grid_thw[i]) // merge_size**2`` copies."""
    pieces = text.split(image_pad)
    if len(pieces) - 1 != len(image_grid_thw):
        raise ValueError(
            f"the text has {len(pieces) - 1} {image_pad} tokens for {len(image_grid_thw)} images"
        )
    counts = [int(g.prod()) // merge_size**2 for g in image_grid_thw]
    return pieces[0] + "".join(image_pad * n + piece for n, piece in zip(counts, pieces[1:], strict=True))


def encode_prompt(sample: PromptSample, tokenizer, image_processor, cfg: DataConfig) -> EncodedPrompt:
    """Encode ``sample``; a prompt the model cannot take raises BadSampleError naming shard and key."""
    image_pad = getattr(tokenizer, "image_token", None) or IMAGE_PAD
    text = chat_text(sample, tokenizer, cfg)
    if text.count(image_pad) != len(sample.images):
        raise BadSampleError(
            sample.shard,
            sample.key,
            f"the chat text holds {text.count(image_pad)} {image_pad} for {len(sample.images)} images "
            f"(does the prompt itself contain {image_pad}?)",
        )
    pixel_values, grid = preprocess_images(sample.images, image_processor, cfg.min_pixels, cfg.max_pixels)
    expanded = expand_image_pads(text, grid, image_processor.merge_size, image_pad)
    input_ids = torch.tensor(tokenizer(expanded, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    if len(input_ids) > cfg.max_prompt_length:
        raise BadSampleError(
            sample.shard,
            sample.key,
            f"the prompt has {len(input_ids)} tokens, more than "
            f"data.max_prompt_length={cfg.max_prompt_length}",
        )
    return EncodedPrompt(
        uid=sample.uid,
        key=sample.key,
        shard=sample.shard,
        prompt_text=text,
        input_ids=input_ids,
        pixel_values=pixel_values,
        image_grid_thw=grid,
        answer=sample.answer,
        answer_type=sample.answer_type,
        source=sample.source,
        images=sample.images,
        masked_images=sample.masked_images,
        vision_dependent=sample.vision_dependent,
        solution=sample.solution,
        extra=sample.extra,
    )
