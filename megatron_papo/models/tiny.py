"""A tiny random Qwen2.5-VL or Qwen3-VL saved as a Hugging Face directory: config, weights, tokenizer,
processor.

No hub access is needed: the byte-level BPE tokenizer is trained here on a small corpus that covers the
synthetic task's words, and the image processor is transformers' own Qwen2-VL one. The shapes honour
vLLM's CPU attention (head size >= 32), so the same directory can be served by vLLM.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

SPECIAL_TOKENS = [
    "<unk>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' or c['type'] == 'image_url' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = (
    "the a an of in on to is are how many what which shape color left right above below sum digits shown "
    "count red green blue yellow purple orange black white circle circles square squares triangle triangles "
    "star image picture answer think reasoning final boxed question there I see so it number total first "
    "then describe largest smallest"
).split()


@dataclass
class TinyQwen25VLSpec:
    """Sizes of the tiny model; the defaults give ~0.6M parameters, head size 32 in both towers."""

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_heads: int = 2
    fullatt_block_indexes: tuple[int, ...] = (1,)
    window_size: int = 56
    tie_word_embeddings: bool = True
    min_pixels: int = 28 * 28
    max_pixels: int = 112 * 112
    seed: int = 0


def _corpus() -> list[str]:
    chars = list(string.digits) + list("+-*/=()[]{}.,:;?!\\<>_ ")
    pieces = [" ".join(_WORDS[(i * 7 + j) % len(_WORDS)] for j in range(12)) for i in range(400)]
    pieces += [
        "<think> "
        + " ".join(chars[(i + j) % len(chars)] for j in range(20))
        + r" </think> \boxed{"
        + str(i)
        + "}"
        for i in range(200)
    ]
    return pieces


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen2-VL's special tokens and a Qwen-style chat template."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


@dataclass
class TinyQwen3VLSpec(TinyQwen25VLSpec):
    """Sizes of the tiny Qwen3-VL: head size 32 in both towers, a learned 8x8 position grid, DeepStack
    from vision blocks 0 and 2 into LM layers 0 and 1 (so a 2-stage pipeline splits them)."""

    vision_depth: int = 3
    num_position_embeddings: int = 64
    deepstack_visual_indexes: tuple[int, ...] = (0, 2)
    min_pixels: int = 32 * 32
    max_pixels: int = 128 * 128


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The vision token fields of a Qwen-VL config."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _text_config(spec: TinyQwen25VLSpec, tokenizer: PreTrainedTokenizerFast, theta: float) -> dict:
    """The LM fields both architectures share (``head_dim / 2`` frequencies split over t, h, w)."""
    half = spec.hidden_size // spec.num_heads // 2
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": mrope},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )


def _vision_config(spec: TinyQwen25VLSpec) -> dict:
    """The vision tower fields both architectures share."""
    return dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_heads=spec.vision_heads,
        out_hidden_size=spec.hidden_size,
    )


def tiny_qwen3vl_config(spec: TinyQwen3VLSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen3VLConfig:
    text = _text_config(spec, tokenizer, theta=5_000_000.0)
    text["rope_parameters"]["mrope_interleaved"] = True
    return Qwen3VLConfig(
        text_config=text | dict(head_dim=spec.hidden_size // spec.num_heads),
        vision_config=_vision_config(spec)
        | dict(
            num_position_embeddings=spec.num_position_embeddings,
            deepstack_visual_indexes=list(spec.deepstack_visual_indexes),
        ),
        tie_word_embeddings=spec.tie_word_embeddings,
        **_special_ids(tokenizer),
    )


def tiny_config(spec: TinyQwen25VLSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=_text_config(spec, tokenizer, theta=10000.0)
        | dict(tie_word_embeddings=spec.tie_word_embeddings),
        vision_config=_vision_config(spec)
        | dict(
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=spec.window_size,
            fullatt_block_indexes=list(spec.fullatt_block_indexes),
        ),
        tie_word_embeddings=spec.tie_word_embeddings,
        **_special_ids(tokenizer),
    )


def make_tiny_qwen25vl(out_dir: str, spec: TinyQwen25VLSpec | None = None) -> str:
    """Write a random tiny Qwen2.5-VL (float32) with tokenizer and processor to ``out_dir``; return it."""
    return _save(out_dir, spec or TinyQwen25VLSpec(), tiny_config, Qwen2_5_VLForConditionalGeneration, 14)


def make_tiny_qwen3vl(out_dir: str, spec: TinyQwen3VLSpec | None = None) -> str:
    """Write a random tiny Qwen3-VL (float32) with tokenizer and processor to ``out_dir``; return it."""
    return _save(out_dir, spec or TinyQwen3VLSpec(), tiny_qwen3vl_config, Qwen3VLForConditionalGeneration, 16)


def _save(out_dir: str, spec: TinyQwen25VLSpec, make_config, model_class, patch_size: int) -> str:
    tokenizer = build_tokenizer(spec.vocab_size)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, patch_size=patch_size
    )
    torch.manual_seed(spec.seed)
    model = model_class(make_config(spec, tokenizer)).to(torch.float32)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    return out_dir
