"""ImageMasker: every strategy of the spec (raw-image 14-px squares, vision-patch grid, Gaussian noise,
precomputed), seeded by (seed, step, sample id) and reproducible, the ratio honoured, the grid unchanged;
the masked RGB images sent to vLLM servers preprocess to exactly the trainer's masked pixel values."""

import numpy as np
import pytest
import torch
from data_helpers import data_config, random_image, tiny_processor_dir
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from megatron_papo.data.config import MaskingConfig
from megatron_papo.data.encode import encode_prompt, preprocess_images
from megatron_papo.data.masking import ImageMasker, mask_raw_grid, mask_rng, unpatchify
from megatron_papo.data.records import BadSampleError, PromptSample

CFG = data_config(min_pixels=56 * 56, max_pixels=448 * 448)


def _bright(size, seed) -> Image.Image:
    """Noise without black pixels, so blackened ones are told apart."""
    return Image.fromarray(np.asarray(random_image(size, seed)) // 2 + 100)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    hf = tiny_processor_dir(str(tmp_path_factory.mktemp("masking")))
    tokenizer, processor = AutoTokenizer.from_pretrained(hf), AutoImageProcessor.from_pretrained(hf)
    images = [_bright((300, 200), 1), _bright((90, 150), 2)]
    sample = PromptSample("q1", "000000001", "s.tar", "Count.", "3", "math", "", images, [])
    return encode_prompt(sample, tokenizer, processor, CFG), processor


def _masker(processor, **cfg) -> ImageMasker:
    return ImageMasker(MaskingConfig(**cfg), processor, CFG.min_pixels, CFG.max_pixels)


def test_raw_grid_blackens_whole_squares_at_the_ratio():
    image = np.asarray(_bright((703, 500), 0))  # 51 x 36 cells of 14 px, the last ones cut by the border
    for ratio in (0.4, 0.6, 0.8):
        out = mask_raw_grid(image, ratio, 14, mask_rng(0, 5, "x"))
        black = (out == 0).all(axis=-1)
        assert ((out == image).all(axis=-1) | black).all()  # a pixel is kept or black, never changed
        cells = np.pad(black, ((0, 4), (0, 11)), mode="edge").reshape(36, 14, 51, 14).transpose(0, 2, 1, 3)
        assert (cells.all(axis=(2, 3)) | ~cells.any(axis=(2, 3))).all()  # whole squares on the 14-px grid
        assert abs(cells.all(axis=(2, 3)).mean() - ratio) < 0.03  # 1836 squares
    assert (mask_raw_grid(image, 1.0, 14, mask_rng(0, 0, "x")) == 0).all()


def test_raw_grid_is_the_preprocessed_masked_image(env):
    prompt, processor = env
    masker = _masker(processor, strategy="raw_grid", ratio=0.6)
    masked = masker(prompt, step=4)
    rng = mask_rng(0, 4, "q1")  # the images are masked in order from one generator
    expected = [Image.fromarray(mask_raw_grid(np.asarray(img), 0.6, 14, rng)) for img in prompt.images]
    pixels, grid = preprocess_images(expected, processor, CFG.min_pixels, CFG.max_pixels)
    assert torch.equal(masked, pixels) and torch.equal(grid, prompt.image_grid_thw)
    assert torch.equal(_masker(processor, ratio=0.0)(prompt, 4), prompt.pixel_values)
    black = [Image.new("RGB", img.size) for img in prompt.images]
    all_black = preprocess_images(black, processor, CFG.min_pixels, CFG.max_pixels)[0]
    assert torch.equal(_masker(processor, ratio=1.0)(prompt, 4), all_black)


@pytest.mark.parametrize("strategy", ["raw_grid", "patch", "noise"])
def test_masks_are_seeded_per_step_and_sample(env, strategy):
    prompt, processor = env
    masker = _masker(processor, strategy=strategy, seed=11)
    first = masker(prompt, step=3)
    assert first.shape == prompt.pixel_values.shape and not torch.equal(first, prompt.pixel_values)
    assert torch.equal(first, masker(prompt, step=3))  # every rollout of the prompt sees this mask
    assert torch.equal(first, _masker(processor, strategy=strategy, seed=11)(prompt, step=3))  # a rerun
    assert not torch.equal(first, masker(prompt, step=4))  # a fresh mask each step
    assert not torch.equal(first, _masker(processor, strategy=strategy, seed=12)(prompt, step=3))
    other = type(prompt)(**{**prompt.__dict__, "uid": "q2"})
    assert not torch.equal(first, masker(other, step=3))


def test_mask_generator_is_stable_across_processes_and_machines():
    # sha256 of the id, not Python's salted hash(): the same value in every process
    assert mask_rng(0, 3, "q1").random() == 0.739196672747801


def test_patch_masking_replaces_whole_patches_at_the_ratio(env):
    prompt, processor = env
    black = preprocess_images([Image.new("RGB", (28, 28))], processor, CFG.min_pixels, CFG.max_pixels)[0][0]
    fractions = []
    for ratio in (0.4, 0.6, 0.8):
        changed, masker = [], _masker(processor, strategy="patch", ratio=ratio)
        for step in range(5):  # 5 x 368 patches
            masked = masker(prompt, step)
            rows = (masked != prompt.pixel_values).any(dim=1)  # a row is one 14x14 (x2 frames) vision patch
            assert torch.equal(masked, torch.where(rows[:, None], black, prompt.pixel_values))
            changed.append(rows)
        fractions.append(torch.cat(changed).float().mean().item())
    assert np.allclose(fractions, (0.4, 0.6, 0.8), atol=0.03)


def test_noise_masking_adds_gaussian_noise_of_the_configured_std(env):
    prompt, processor = env
    for std in (0.6, 0.8):
        noise = _masker(processor, strategy="noise", noise_std=std)(prompt, step=2) - prompt.pixel_values
        assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - std) < 0.01


def test_precomputed_masks_come_from_the_sample(env):
    prompt, processor = env
    stored = [Image.new("RGB", img.size, (0, 0, 0)) for img in prompt.images]
    stored[0].paste(prompt.images[0].crop((0, 0, 100, 100)))
    with_masks = type(prompt)(**{**prompt.__dict__, "masked_images": stored})
    masked = _masker(processor, strategy="precomputed")(with_masks, step=0)
    assert torch.equal(masked, preprocess_images(stored, processor, CFG.min_pixels, CFG.max_pixels)[0])
    with pytest.raises(
        BadSampleError, match="sample 000000001: masking.strategy=precomputed but the sample stores 0"
    ):
        _masker(processor, strategy="precomputed")(prompt, step=0)
    wrong_size = type(prompt)(
        **{**prompt.__dict__, "masked_images": [img.resize((56, 56)) for img in stored]}
    )
    with pytest.raises(BadSampleError, match="masked images preprocess to"):
        _masker(processor, strategy="precomputed")(wrong_size, step=0)


def test_unpatchify_inverts_the_processor(env):
    prompt, processor = env
    resized = unpatchify(prompt.pixel_values, prompt.image_grid_thw, processor)
    for image, (_, gh, gw) in zip(resized, prompt.image_grid_thw.tolist(), strict=True):
        assert image.shape == (gh * 14, gw * 14, 3) and image.dtype == np.uint8
        assert not (image == 0).all(axis=-1).any()  # the bright originals, no black pixel
    again = preprocess_images(
        [Image.fromarray(a) for a in resized], processor, CFG.min_pixels, CFG.max_pixels
    )
    assert torch.equal(again[0], prompt.pixel_values) and torch.equal(again[1], prompt.image_grid_thw)


@pytest.mark.parametrize("strategy", ["raw_grid", "patch", "precomputed"])
def test_masked_images_preprocess_to_the_masked_pixel_values(env, strategy):
    """What a vLLM server is sent for the masked pass: RGB images (one per image of the prompt) that the
    same processor turns into exactly the pixels the trainer masks, under the same seed."""
    prompt, processor = env
    stored = [mask_raw_grid(np.asarray(img), 0.5, 20, mask_rng(7, 0, "stored")) for img in prompt.images]
    prompt = type(prompt)(**{**prompt.__dict__, "masked_images": [Image.fromarray(a) for a in stored]})
    masker = _masker(processor, strategy=strategy, seed=5)
    for step in (0, 3):
        images = masker.images(prompt, step)
        assert len(images) == len(prompt.images) and all(img.mode == "RGB" for img in images)
        pixels, grid = preprocess_images(images, processor, CFG.min_pixels, CFG.max_pixels)
        expected = masker(prompt, step)
        assert not torch.equal(expected, prompt.pixel_values)
        assert torch.equal(pixels, expected) and torch.equal(grid, prompt.image_grid_thw)
    if strategy == "raw_grid":  # the raw images with the trainer's squares, at their own size
        rng = mask_rng(5, 3, "q1")
        for image, original in zip(images, prompt.images, strict=True):
            assert np.array_equal(np.asarray(image), mask_raw_grid(np.asarray(original), 0.6, 14, rng))


def test_noise_masked_images_are_refused_naming_the_alternatives(env):
    prompt, processor = env
    with pytest.raises(ValueError, match="masking.strategy=noise .* use masking.strategy raw_grid, patch or"):
        _masker(processor, strategy="noise").images(prompt, step=0)


def test_bad_masking_settings_are_refused():
    for bad, message in (
        ({"strategy": "blur"}, "masking.strategy must be one of .* got 'blur'"),
        ({"ratio": 1.5}, r"masking.ratio must be in \[0, 1\]"),
        ({"square_size": 0}, "square_size must be >= 1"),
        ({"noise_std": 0.0}, "noise_std must be > 0"),
    ):
        with pytest.raises(ValueError, match=message):
            MaskingConfig(**bad)
