"""Image and text processors of BLIP-2, written with PIL / numpy / torch (no torchvision).

Image side:

* :class:`ImageTrainProcessor`: random resized crop (scale 0.5-1, aspect ratio 3/4-4/3,
  bicubic) + horizontal flip (p=0.5) + CLIP normalisation, BLIP-2's train transform.
* :class:`ImageEvalProcessor`: bicubic resize of the whole image to ``s x s`` + CLIP
  normalisation, BLIP-2's eval transform.

Both decode JPEGs with PIL's draft mode when allowed: libjpeg can scale by 1/2, 1/4 or
1/8 while decoding (in the DCT domain), which is several times cheaper than a full
decode of a large photo. The crop box is chosen in original coordinates first, then the
largest draft reduction that keeps the crop region at or above the target resolution is
requested, and the box is scaled to the drafted image before the final bicubic resize.
So draft mode only ever replaces "downscale by bicubic" with "downscale by DCT scaling
then bicubic"; it never upsamples.

Text side: :class:`CaptionProcessor` and :class:`QuestionProcessor` reproduce LAVIS's
``BlipCaptionProcessor`` / ``BlipQuestionProcessor`` string rules.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: What the image processors accept: encoded bytes, a file path, or an opened PIL image.
ImageInput = bytes | str | Path | Image.Image

# Modes whose pixels carry an alpha channel; they are composited on white.
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_WHITE = (255, 255, 255)
# Formats decoded by libjpeg, which can scale by 1/2, 1/4, 1/8 while decoding (MPO: camera JPEGs).
_DRAFTABLE_FORMATS = {"JPEG", "MPO"}


class SampleError(ValueError):
    """A sample cannot be used; ``reason`` is the short key it is counted under in the skip stats."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


class ImageDecodeError(SampleError):
    """An image could not be decoded (reasons: undecodable / truncated / corrupt / too large)."""


# ----------------------------------------------------------------------------- decoding


@contextlib.contextmanager
def _as_decode_error():
    """Translate PIL's decode failures into :class:`ImageDecodeError` with a counter reason."""
    try:
        yield
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as err:
        raise ImageDecodeError("undecodable_image", f"not a readable image: {err}") from None
    except Image.DecompressionBombError as err:
        raise ImageDecodeError("image_too_large", str(err)) from None
    except FileNotFoundError as err:
        raise ImageDecodeError("missing_image", str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # PIL reports a cut-off file as OSError("image file is truncated ...") or as
        # "broken data stream"; everything else is a corrupt image.
        message = str(err)
        truncated = "truncated" in message or "broken data stream" in message
        raise ImageDecodeError("truncated_image" if truncated else "corrupt_image", message) from None


def open_image(source: ImageInput) -> Image.Image:
    """Open (lazily, without decoding pixels) an image from bytes, a path or a PIL image."""
    if isinstance(source, Image.Image):
        return source
    with _as_decode_error():
        if isinstance(source, (bytes, bytearray, memoryview)):
            return Image.open(io.BytesIO(source))
        return Image.open(source)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Alpha (RGBA, LA, PA, and palette / grey / RGB images with a ``transparency`` entry)
    is composited on white, which is how such images look on the web pages their
    captions come from; dropping alpha instead would show whatever colour the
    transparent pixels happen to store (often black). 16-bit greyscale is scaled to 8 bit
    rather than clipped (PIL's ``convert`` clips, turning most of the image white).
    CMYK, YCbCr, greyscale and bilevel go through PIL's own conversion.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        image.load()
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        pixels = np.asarray(image).astype(np.float32)
        if mode in _SIXTEEN_BIT_MODES or pixels.max(initial=0) > 255:
            pixels = pixels / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        pixels = np.clip(np.asarray(image), 0, 255).round().astype(np.uint8)
        return Image.fromarray(pixels, "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def decode_region(
    source: ImageInput,
    box: tuple[float, float, float, float] | None,
    out_size: int,
    use_draft: bool = True,
    choose_box: Callable[[int, int], tuple[float, float, float, float]] | None = None,
) -> Image.Image:
    """Decode ``box`` (left, top, right, bottom in original pixels) of an image to ``out_size``².

    ``box=None`` means the whole image. ``choose_box(width, height) -> box`` may be given
    instead, for callers (the random crop) that need the original size before choosing
    the box; the header is read without decoding pixels. With ``use_draft`` a JPEG is
    decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) that keeps the box at least
    ``out_size`` pixels wide and high (an image that is already decoded is used as is).
    The result is always RGB. Raises :class:`ImageDecodeError` with a reason for
    anything PIL cannot read.
    """
    image = open_image(source)
    with _as_decode_error():
        width, height = image.size
        if choose_box is not None:
            box = choose_box(width, height)
        if box is None:
            box = (0.0, 0.0, float(width), float(height))
        if use_draft and image.format in _DRAFTABLE_FORMATS:
            box = _draft_for_box(image, box, out_size)
        return to_rgb(image).resize((out_size, out_size), Image.Resampling.BICUBIC, box=box)


def _draft_for_box(
    image: Image.Image, box: tuple[float, float, float, float], out_size: int
) -> tuple[float, float, float, float]:
    """Ask libjpeg for a reduced decode that keeps ``box`` >= ``out_size``; return the scaled box."""
    width, height = image.size
    box_width, box_height = box[2] - box[0], box[3] - box[1]
    # PIL picks the largest reduction r in {1, 2, 4, 8} with size // r >= requested size
    # in both axes; requesting size * out / box makes the box itself stay >= out_size.
    requested = (
        max(1, math.ceil(width * out_size / max(box_width, 1e-6))),
        max(1, math.ceil(height * out_size / max(box_height, 1e-6))),
    )
    drafted = image.draft("RGB", requested)
    if drafted is None:  # already decoded, or not a single-tile JPEG
        return box
    _, (_, _, scaled_width, _) = drafted
    scale = scaled_width / width  # exactly 1/r, the drafted size may round up by one pixel
    return (box[0] * scale, box[1] * scale, box[2] * scale, box[3] * scale)


def load_rgb(source: ImageInput) -> Image.Image:
    """Fully decode an image to RGB (no resizing); raises :class:`ImageDecodeError`."""
    image = open_image(source)
    with _as_decode_error():
        return to_rgb(image)


def check_decodable(source: ImageInput) -> None:
    """Decode an image as cheaply as possible (1/8 JPEG scale) to find out whether it is valid.

    Used to fast-forward a loader on resume: a sample is valid here exactly when the full
    processors can decode it (a truncated or corrupt entropy-coded stream fails at any
    DCT scale), but the work is a fraction of a real decode.
    """
    decode_region(source, None, out_size=1, use_draft=True)


# ----------------------------------------------------------------------------- tensors


class _Normalizer:
    """uint8 RGB PIL image -> float tensor [3, H, W] normalised with mean/std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        # (x / 255 - mean) / std == x * scale + shift, two in-place ops on the tensor.
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
        tensor = pixels.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
        return tensor.mul_(self.scale).add_(self.shift)


def sample_random_resized_crop(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
) -> tuple[int, int, int, int]:
    """Pick a crop box (left, top, right, bottom) as torchvision's RandomResizedCrop does.

    Up to 10 tries of (area fraction in ``scale``, log-uniform aspect ratio in
    ``ratio``) that fit the image; otherwise a centre crop with the aspect ratio clamped
    to ``ratio``.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = rng.randint(0, height - crop_h)
            left = rng.randint(0, width - crop_w)
            return left, top, left + crop_w, top + crop_h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        crop_w, crop_h = round(height * ratio[1]), height
    else:
        crop_w, crop_h = width, height
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


class ImageTrainProcessor:
    """BLIP-2 train transform: random resized crop + horizontal flip + CLIP normalisation."""

    def __init__(
        self,
        image_size: int = 224,
        min_scale: float = 0.5,
        max_scale: float = 1.0,
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        horizontal_flip: bool = True,
        use_draft: bool = True,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        self.image_size = image_size
        self.scale = (min_scale, max_scale)
        self.ratio = ratio
        self.horizontal_flip = horizontal_flip
        self.use_draft = use_draft
        self._normalize = _Normalizer(mean, std)

    def __call__(self, source: ImageInput, rng: random.Random | None = None) -> torch.Tensor:
        """Return a float tensor [3, S, S]; ``rng`` makes the crop and flip reproducible."""
        rng = rng if rng is not None else random.Random()
        crop = decode_region(
            source,
            None,
            self.image_size,
            use_draft=self.use_draft,
            choose_box=lambda w, h: sample_random_resized_crop(w, h, self.scale, self.ratio, rng),
        )
        if self.horizontal_flip and rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self._normalize(crop)


class ImageEvalProcessor:
    """BLIP-2 eval transform: bicubic resize of the whole image to S x S + CLIP normalisation.

    Draft mode is off by default so evaluation matches a plain PIL resize exactly; turn
    it on for throughput where that does not matter.
    """

    def __init__(
        self,
        image_size: int = 224,
        use_draft: bool = False,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        self.image_size = image_size
        self.use_draft = use_draft
        self._normalize = _Normalizer(mean, std)

    def __call__(self, source: ImageInput, rng: random.Random | None = None) -> torch.Tensor:
        """Return a float tensor [3, S, S]; ``rng`` is accepted (and unused) for symmetry."""
        del rng
        return self._normalize(decode_region(source, None, self.image_size, use_draft=self.use_draft))


# ----------------------------------------------------------------------------- text

# BLIP's punctuation set: these characters become spaces in captions and vanish in questions.
_BLIP_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_MULTI_SPACE = re.compile(r"\s{2,}")


def _truncate_words(text: str, max_words: int) -> str:
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


class CaptionProcessor:
    """LAVIS ``BlipCaptionProcessor``: normalise a caption and prepend an optional prompt.

    Lower-case, replace ``[.!"()*#:;~]`` with spaces, collapse runs of whitespace, strip a
    trailing newline and surrounding spaces, keep at most ``max_words`` words, then
    prefix ``prompt`` (e.g. ``"a photo of "``; the prompt itself is not normalised).
    """

    def __init__(self, prompt: str = "", max_words: int = 50):
        self.prompt = prompt
        self.max_words = max_words

    def clean(self, caption: str) -> str:
        """The normalised caption without the prompt."""
        caption = _BLIP_PUNCTUATION.sub(" ", caption.lower())
        caption = _MULTI_SPACE.sub(" ", caption)
        caption = caption.rstrip("\n").strip(" ")
        return _truncate_words(caption, self.max_words)

    def __call__(self, caption: str) -> str:
        return self.prompt + self.clean(caption)


class QuestionProcessor:
    """LAVIS ``BlipQuestionProcessor``: lower-case, delete ``[.!"()*#:;~]``, strip, max words.

    A trailing ``?`` is kept (it is not in the set), as in LAVIS.
    """

    def __init__(self, max_words: int = 50):
        self.max_words = max_words

    def __call__(self, question: str) -> str:
        question = _BLIP_PUNCTUATION.sub("", question.lower()).strip()
        return _truncate_words(question, self.max_words)
