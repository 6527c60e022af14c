"""encode_prompt on samples read back from a real shard equals transformers: pixel_values and image_grid_thw
of a fresh Qwen2-VL image processor at the configured pixel limits, chat text, image-pad expansion and
input_ids of Qwen2_5_VLProcessor (images of several sizes and modes, multi-image, up- and down-scaling)."""

import io

import pytest
import torch
from data_helpers import data_config, random_image, read_samples, tiny_processor_dir
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from megatron_papo.data.config import DataConfig
from megatron_papo.data.encode import encode_prompt
from megatron_papo.data.records import BadSampleError
from megatron_papo.data.shard_format import ShardSample
from megatron_papo.data.shard_writer import ShardWriter


class ImageProcessorOnly(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without its video processor (that one needs torchvision, not installed)."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


def _encoded_image(size, mode: str, fmt: str, seed: int) -> bytes:
    image = random_image(size, seed)
    if mode == "RGBA":  # a varying alpha: the RGB conversion must composite on white like transformers
        image.putalpha(random_image(size, seed + 1).convert("L"))
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


# (prompt, images as (size, mode, format)): up-scaled, down-scaled (> max_pixels), odd aspect, multi-image
SAMPLES = [
    ("How many red circles?", [((30, 20), "RGB", "PNG")]),
    ("What color is the square?", [((200, 150), "RGBA", "PNG")]),
    ("Is it left or right?", [((33, 90), "L", "JPEG")]),
    ("Compare <image> with <image>: which is larger?", [((45, 60), "RGB", "JPEG"), ((70, 28), "P", "PNG")]),
    ("Sum the digits.", [((64, 64), "RGB", "WEBP"), ((28, 28), "RGB", "PNG"), ((100, 40), "RGB", "PNG")]),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    hf = tiny_processor_dir(str(root / "hf"))
    sources = []
    with ShardWriter(str(root / "shards")) as writer:
        for i, (prompt, specs) in enumerate(SAMPLES):
            images = [
                _encoded_image(size, mode, fmt, 10 * i + j) for j, (size, mode, fmt) in enumerate(specs)
            ]
            writer.write(ShardSample(f"s{i}", prompt, "1", images))
            sources.append(images)
        manifest = writer.close()
    samples = read_samples(manifest)
    return samples, sources, AutoTokenizer.from_pretrained(hf), AutoImageProcessor.from_pretrained(hf)


def _messages(prompt: str, num_images: int, cfg: DataConfig) -> list[dict]:
    """The chat the reference recipe builds: the images at the ``<image>`` markers, else first."""
    question = cfg.question_template.replace("{question}", prompt)
    if "<image>" not in question:
        return [
            {
                "role": "user",
                "content": [{"type": "image"}] * num_images + [{"type": "text", "text": question}],
            }
        ]
    content = []
    for k, piece in enumerate(question.split("<image>")):
        content += ([{"type": "image"}] if k else []) + ([{"type": "text", "text": piece}] if piece else [])
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("pixels", ["small", "default"])
def test_encoding_equals_transformers(env, pixels):
    samples, sources, tokenizer, processor = env
    cfg = data_config() if pixels == "small" else DataConfig()
    reference = ImageProcessorOnly(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
    grids = set()
    for sample, encoded_images in zip(samples, sources, strict=True):
        out = encode_prompt(sample, tokenizer, processor, cfg)
        originals = [Image.open(io.BytesIO(data)) for data in encoded_images]  # as stored: RGBA, L, P, ...
        text = reference.apply_chat_template(
            _messages(sample.prompt, len(originals), cfg), tokenize=False, add_generation_prompt=True
        )
        expected = reference(images=originals, text=[text], return_tensors="pt")
        assert out.prompt_text == text
        assert torch.equal(out.input_ids, expected["input_ids"][0])
        assert out.pixel_values.dtype == torch.float32 and out.image_grid_thw.dtype == torch.int64
        assert torch.equal(out.pixel_values, expected["pixel_values"])
        assert torch.equal(out.image_grid_thw, expected["image_grid_thw"])
        pads = int((out.input_ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
        assert pads == int(out.image_grid_thw.prod(dim=1).sum()) // 4
        grids.update(map(tuple, out.image_grid_thw.tolist()))
        for _, h, w in out.image_grid_thw.tolist():
            assert cfg.min_pixels <= h * w * 14 * 14 <= cfg.max_pixels
    if pixels == "small":  # 30x20 is scaled up to one token, 200x150 down to 6x8 patches (else 10x14)
        assert (1, 2, 2) in grids and (1, 6, 8) in grids


def test_image_markers_place_the_images(env):
    samples, _, tokenizer, processor = env
    text = encode_prompt(samples[3], tokenizer, processor, data_config(system_prompt="Be brief.")).prompt_text
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert f"Compare {pad} with {pad}: which is larger?" in text
    assert text.endswith("<|im_start|>assistant\n") and "<image>" not in text


def test_prompts_the_model_cannot_take_are_named(env):
    samples, _, tokenizer, processor = env
    where = f"shard {samples[3].shard}, sample 000000003"
    samples[3].images.append(samples[3].images[0])
    try:
        with pytest.raises(BadSampleError, match=f"{where}: the prompt has 2 '<image>' markers for 3 images"):
            encode_prompt(samples[3], tokenizer, processor, data_config())
    finally:
        samples[3].images.pop()
    with pytest.raises(BadSampleError, match=r"sample 000000000: the prompt has \d+ tokens, more than .*=20"):
        encode_prompt(samples[0], tokenizer, processor, data_config(max_prompt_length=20))
    sample = samples[0]
    sneaky = type(sample)(**{**sample.__dict__, "prompt": "What is <|image_pad|>?"})
    with pytest.raises(BadSampleError, match=r"holds 2 <\|image_pad\|> for 1 images"):
        encode_prompt(sneaky, tokenizer, processor, data_config())
