"""Image and text processors: exactness of the eval transform, draft-mode tolerance, modes, text rules."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from data_helpers import encode, jpeg_bytes, make_photo, truncated_jpeg
from PIL import Image

from blip2_megatron.data.processors import (
    CLIP_MEAN,
    CLIP_STD,
    CaptionProcessor,
    ImageDecodeError,
    ImageEvalProcessor,
    ImageTrainProcessor,
    QuestionProcessor,
    _draft_for_box,
    check_decodable,
    decode_region,
    open_image,
    sample_random_resized_crop,
    to_rgb,
)

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def reference_normalize(image: Image.Image) -> torch.Tensor:
    """The textbook ToTensor + Normalize, to compare against."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return (torch.from_numpy(array).permute(2, 0, 1) - MEAN) / STD


def to_pixels(tensor: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: back to the 0..255 scale."""
    return (tensor * STD + MEAN) * 255.0


@pytest.mark.parametrize("size", [224, 364])
def test_eval_transform_equals_pil_bicubic_resize_and_normalise(size):
    data = jpeg_bytes(500, 375, seed=1)
    expected = reference_normalize(
        open_image(data).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    )
    result = ImageEvalProcessor(size)(data)
    assert result.shape == (3, size, size) and result.dtype == torch.float32
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)


def test_train_transform_shape_determinism_and_flip():
    data = jpeg_bytes(320, 240, seed=2)
    processor = ImageTrainProcessor(224)
    first = processor(data, random.Random(7))
    assert first.shape == (3, 224, 224)
    torch.testing.assert_close(first, processor(data, random.Random(7)), atol=0, rtol=0)
    # With only full-image crops, a flipped output is the mirror of an unflipped one.
    no_crop = ImageTrainProcessor(64, min_scale=1.0, ratio=(320 / 240, 320 / 240))
    outputs = [no_crop(data, random.Random(seed)) for seed in range(12)]
    flipped = [out for out in outputs if not torch.allclose(out, outputs[0])]
    assert flipped, "p=0.5 flip never happened in 12 draws"
    torch.testing.assert_close(flipped[0], outputs[0].flip(-1), atol=1e-5, rtol=0)


def test_random_resized_crop_respects_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(500):
        width, height = rng.randint(50, 2000), rng.randint(50, 2000)
        left, top, right, bottom = sample_random_resized_crop(width, height, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        crop_w, crop_h = right - left, bottom - top
        sampled = (
            0.5 * 0.95 <= crop_w * crop_h / (width * height)
            and 3 / 4 * 0.95 <= crop_w / crop_h <= 4 / 3 * 1.05
        )
        centred = (left, top) == ((width - crop_w) // 2, (height - crop_h) // 2)
        fallback = centred and (crop_w == width or crop_h == height)  # after 10 misses
        assert sampled or fallback
    # A very wide image cannot fit the ratio: centre crop with the ratio clamped to 4/3.
    assert sample_random_resized_crop(1000, 10, (0.99, 1.0), (3 / 4, 4 / 3), random.Random(0)) == (
        493,
        0,
        506,
        10,
    )


@pytest.mark.parametrize("size", [224, 364])
def test_draft_decode_is_close_to_full_decode(size):
    """Tolerance: mean |difference| <= 1.0 and 99th percentile <= 3 grey levels (of 255).

    DCT-domain downscaling averages 2x2 / 4x4 blocks before the bicubic resize instead
    of letting bicubic's antialias filter see every pixel; on photo-like content the
    results differ by about half a grey level on average (measured: mean <= 0.61, 99th
    percentile 2, max 5 levels over these crops at 224 and 364 px).
    """
    data = jpeg_bytes(1600, 1200, seed=3)
    fast = ImageTrainProcessor(size, use_draft=True)
    full = ImageTrainProcessor(size, use_draft=False)
    for seed in range(6):
        diff = (to_pixels(fast(data, random.Random(seed))) - to_pixels(full(data, random.Random(seed)))).abs()
        assert diff.mean() <= 1.0
        assert torch.quantile(diff.flatten(), 0.99) <= 3.0


def test_draft_keeps_crop_at_target_resolution():
    """The drafted image is reduced as much as possible while the box stays >= the output size."""
    data = jpeg_bytes(1600, 1200, seed=4)
    seen_reductions = set()
    rng = random.Random(0)
    for _ in range(40):
        out = rng.choice([224, 364])
        box = sample_random_resized_crop(1600, 1200, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        scaled = _draft_for_box(open_image(data), box, out)
        reduction = round((box[2] - box[0]) / (scaled[2] - scaled[0]))
        seen_reductions.add(reduction)
        assert scaled[2] - scaled[0] >= out and scaled[3] - scaled[1] >= out
        # The next larger reduction would have made the box too small.
        if reduction < 8:
            assert min(box[2] - box[0], box[3] - box[1]) / (2 * reduction) < out
    assert seen_reductions >= {2, 4}


def test_non_jpeg_and_small_images_are_not_drafted():
    png = encode(make_photo(100, 80), "PNG")
    result = decode_region(png, None, 32, use_draft=True)
    assert result.size == (32, 32)
    small = jpeg_bytes(40, 30)  # smaller than the output: upscaled by bicubic, no draft
    expected = open_image(small).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(decode_region(small, None, 64)), np.asarray(expected))


# ----------------------------------------------------------------------------- modes


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    rgb = to_rgb(open_image(encode(rgba, "PNG")))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((3, 3)) == (255, 255, 255)  # fully transparent -> white, not red
    assert rgb.getpixel((0, 0)) == (0, 0, 255)
    assert all(abs(channel - 127) <= 1 for channel in rgb.getpixel((1, 0)))  # half black on white


def test_palette_with_transparency_and_pa():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.info["transparency"] = 0
    rgb = to_rgb(open_image(encode(palette, "PNG", transparency=0)))
    assert rgb.getpixel((0, 0)) == (10, 200, 30) and rgb.getpixel((2, 2)) == (255, 255, 255)
    pa = Image.new("PA", (2, 2))
    pa.putpalette([50, 60, 70] + [0] * 765)
    pa.putpixel((0, 0), (0, 255))
    pa.putpixel((1, 0), (0, 0))
    rgb = to_rgb(pa)
    assert rgb.getpixel((0, 0)) == (50, 60, 70) and rgb.getpixel((1, 0)) == (255, 255, 255)


def test_greyscale_modes():
    grey = Image.new("L", (3, 3), 77)
    assert to_rgb(open_image(encode(grey, "PNG"))).getpixel((1, 1)) == (77, 77, 77)
    la = Image.new("LA", (2, 2), (0, 0))
    assert to_rgb(open_image(encode(la, "PNG"))).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.array([[0, 65535], [32896, 257]], dtype=np.uint16))
    reopened = open_image(encode(sixteen, "PNG"))
    assert reopened.mode.startswith("I")
    rgb = to_rgb(reopened)
    assert [rgb.getpixel((x, y))[0] for y in range(2) for x in range(2)] == [0, 255, 128, 1]
    jpeg_grey = open_image(encode(Image.new("L", (300, 300), 200), "JPEG"))
    out = decode_region(jpeg_grey, None, 32)
    assert out.mode == "RGB" and abs(out.getpixel((5, 5))[0] - 200) <= 2


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # pure red in CMYK
    result = ImageEvalProcessor(32)(encode(cmyk, "JPEG", quality=95))
    pixel = to_pixels(result)[:, 16, 16]
    assert pixel[0] > 230 and pixel[1] < 30 and pixel[2] < 30


def test_bad_bytes_raise_with_reason():
    with pytest.raises(ImageDecodeError) as truncated:
        ImageTrainProcessor(32)(truncated_jpeg(), random.Random(0))
    assert truncated.value.reason == "truncated_image"
    with pytest.raises(ImageDecodeError) as garbage:
        ImageEvalProcessor(32)(b"definitely not an image")
    assert garbage.value.reason == "undecodable_image"
    with pytest.raises(ImageDecodeError):
        check_decodable(truncated_jpeg())
    check_decodable(jpeg_bytes())


def test_decompression_bombs_are_skipped_not_fatal(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL raises above twice this
    with pytest.raises(ImageDecodeError) as bomb:
        ImageEvalProcessor(8)(jpeg_bytes(40, 30))
    assert bomb.value.reason == "image_too_large"


# ----------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A Dog (brown) on the grass!", "a dog brown on the grass"),
        ('He said: "hi"; ok~ #tag *star*', "he said hi ok tag star"),
        ("  Spaces   everywhere.  \n", "spaces everywhere"),
        ("keeps commas, question marks? and hy-phens", "keeps commas, question marks? and hy-phens"),
    ],
)
def test_caption_processor_matches_blip_rules(raw, expected):
    assert CaptionProcessor()(raw) == expected


def test_caption_processor_prompt_and_max_words():
    words = " ".join(f"w{i}" for i in range(60))
    assert CaptionProcessor(max_words=50)(words).split() == [f"w{i}" for i in range(50)]
    processor = CaptionProcessor(prompt="a photo of ", max_words=3)
    assert processor("A CAT sitting on a mat.") == "a photo of a cat sitting"
    assert processor.clean("A CAT.") == "a cat"


def test_question_processor_matches_lavis():
    processor = QuestionProcessor(max_words=50)
    assert processor("What colour is the (big) bus?") == "what colour is the big bus?"
    assert processor("Is it 3.5 metres tall?  ") == "is it 35 metres tall?"
    assert QuestionProcessor(max_words=2)("How many dogs are there?") == "how many"


def test_processors_are_picklable_for_workers():
    import pickle

    for processor in (
        ImageTrainProcessor(32),
        ImageEvalProcessor(32),
        CaptionProcessor("p "),
        QuestionProcessor(),
    ):
        pickle.loads(pickle.dumps(processor))


def test_decode_region_box_crop_matches_pil_crop_resize():
    data = jpeg_bytes(200, 150, seed=5)
    box = (10, 20, 150, 130)
    expected = open_image(data).convert("RGB").crop(box).resize((48, 48), Image.Resampling.BICUBIC)
    result = decode_region(data, box, 48, use_draft=False)
    diff = np.abs(np.asarray(result, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert diff.max() <= 1 and math.isclose(diff.mean(), 0.0, abs_tol=0.05)
