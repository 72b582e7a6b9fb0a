"""Image decoding and conversion, train/eval augmentation and batched tokenisation.

Used by prepare (decode any raw file to RGB, resize once) and by the grain pipelines (random-
resized crop + flip for training, centre crop for evaluation, one tokenizer call per batch).
Images leave the pipeline as uint8: the model normalises them on the device.

This module deliberately imports neither grain nor transformers: decode workers (prepare's pool,
grain's worker processes) import it, and their start-up time is part of every run.
"""

import dataclasses
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

# Files prepare and predict treat as images (by extension, case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Inception-style random-resized crop: area fraction and aspect-ratio range.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# Evaluation crops the central 87.5% of the shorter side (224 of 256), the ImageNet convention.
EVAL_CROP_FRACTION = 0.875
# How prepare stores an image (``resize_shorter``) and evaluation crops it (``center_crop``);
# a model's ``Preprocessing`` records these, and predicting follows what it records.
STORED_RESAMPLE = "bicubic"
STORED_REDUCING_GAP = 3.0
MAX_ASPECT = 2.0
CROP_RESAMPLE = "bilinear"
# Resampling filters by the names a model's preprocessing records (PIL's filters).
RESAMPLE = {"nearest": Image.NEAREST, "box": Image.BOX, "bilinear": Image.BILINEAR,
            "hamming": Image.HAMMING, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """How prepare stores images: shorter side, format, JPEG quality, decode-bomb bound (which
    also bounds the resized image), and whether the EXIF orientation tag is applied."""

    size: int = 256
    fmt: str = "jpeg"
    quality: int = 95
    max_pixels: int = 50_000_000
    exif_transpose: bool = True


class ResizeBombError(ValueError):
    """An image whose shorter-side resize would exceed the pixel bound (e.g. 1 x 600,000 px)."""


def open_image(source, max_pixels: int) -> Image.Image:
    """Opens and fully decodes an image, treating oversized images as errors.

    Args:
      source: a path or a file-like object.
      max_pixels: images with more pixels are rejected as decompression bombs.

    Returns:
      The loaded PIL image (any mode).

    Raises:
      OSError, ValueError, Image.DecompressionBombError: unreadable, truncated or oversized input.
    """
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x the limit; a bomb must never be decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            img.load()
    finally:
        Image.MAX_IMAGE_PIXELS = previous  # a process-wide setting: leave it as found
    return img


def decode_rgb(source, max_pixels: int, exif_transpose: bool) -> Image.Image:
    """Opens, fully decodes and converts an image file to RGB, as prepare stores it.

    Args:
      source: a path or a file-like object.
      max_pixels: the decompression-bomb bound (``open_image``).
      exif_transpose: turn the image upright by its EXIF orientation tag (phone photos), as
        the model's recorded preprocessing says; without a tag nothing changes.

    Returns:
      An RGB image.
    """
    return to_rgb(upright(open_image(source, max_pixels), exif_transpose))


def upright(img: Image.Image, exif_transpose: bool) -> Image.Image:
    """The image turned by its EXIF orientation tag when ``exif_transpose``, else as stored."""
    return ImageOps.exif_transpose(img) if exif_transpose else img


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB.

    16-bit and 32-bit grey images are rescaled to 0..255 (PIL's own conversion would clip them to
    white); palette and grey images are expanded; the alpha channel is dropped like PIL's
    ``convert('RGB')`` does, which matches the reference training code.

    Args:
      img: a decoded image.

    Returns:
      An RGB image.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_shorter(img: Image.Image, size: int, max_aspect: float = MAX_ASPECT,
                   resample: str = STORED_RESAMPLE,
                   reducing_gap: float | None = STORED_REDUCING_GAP,
                   max_pixels: int = EncodeOptions.max_pixels) -> Image.Image:
    """Resizes so the shorter side is `size`, keeping the aspect ratio.

    Args:
      img: an RGB image.
      size: target shorter side.
      max_aspect: the longer side is centre-cropped to at most max_aspect * size, which bounds
        the stored size of panoramas (the real data is square or nearly so).
      resample: a ``RESAMPLE`` filter name.
      reducing_gap: PIL's ``reducing_gap`` (first shrink by an integer factor), or None.
      max_pixels: the bound on the resized image's pixels (the decode bound): a thin strip
        that passes the decode bound can still resize to billions of pixels.

    Returns:
      The resized image.

    Raises:
      ResizeBombError: the resize would exceed ``max_pixels``.
    """
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if nw * nh > max_pixels:
        raise ResizeBombError(f"a {w}x{h} image resizes to {nw}x{nh} pixels at shorter side "
                              f"{size}, over the bound of {max_pixels} pixels")
    if (nw, nh) != (w, h):
        # reducing_gap first shrinks by an integer factor (fast), then resamples exactly.
        img = img.resize((nw, nh), RESAMPLE[resample], reducing_gap=reducing_gap)
    limit = round(max_aspect * size)
    if max(nw, nh) > limit:
        left, top = (nw - min(nw, limit)) // 2, (nh - min(nh, limit)) // 2
        img = img.crop((left, top, left + min(nw, limit), top + min(nh, limit)))
    return img


def encode(img: Image.Image, fmt: str, quality: int = 95) -> bytes:
    """Encodes an RGB image as 'jpeg' (with `quality`) or 'png'."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def as_pil(image) -> Image.Image:
    """A stored record image (encoded bytes or a decoded uint8 array) as an RGB PIL image."""
    if isinstance(image, (bytes, np.bytes_)):
        return to_rgb(Image.open(io.BytesIO(image)))
    return Image.fromarray(np.asarray(image))


class RawView:
    """A raw image as evaluation sees it: prepare's decode, RGB, shorter-side resize and
    re-encode at the stored size, then the centre crop (``EvalTransform``'s view).

    Build it from a model's recorded preprocessing (``Preprocessing.image_view``), never by
    hand, so that prediction sees what training saw.

    Args:
      stored_size, stored_format, jpeg_quality, max_pixels: how prepare stored the records.
      exif_transpose: prepare turned images upright by their EXIF orientation tag.
      resize_resample, resize_reducing_gap, max_aspect: prepare's shorter-side resize.
      crop_size, crop_fraction, crop_resample: the evaluation centre crop.
    """

    def __init__(self, *, stored_size: int, stored_format: str, jpeg_quality: int,
                 max_pixels: int, resize_resample: str, resize_reducing_gap: float | None,
                 max_aspect: float, crop_size: int, crop_fraction: float, crop_resample: str,
                 exif_transpose: bool = False):
        self.stored = (int(stored_size), stored_format, int(jpeg_quality))
        self.max_pixels = int(max_pixels)
        self.exif_transpose = bool(exif_transpose)
        self.resize = {"max_aspect": max_aspect, "resample": resize_resample,
                       "reducing_gap": resize_reducing_gap, "max_pixels": self.max_pixels}
        self.crop = (int(crop_size), crop_fraction, crop_resample)

    def stored_image(self, image) -> bytes:
        """The encoded stored image of a path, PIL image or uint8 array, as prepare writes it.

        Raises:
          ValueError: one line, when the file cannot be decoded or the array is not an image.
        """
        size, fmt, quality = self.stored
        if not isinstance(image, (str, os.PathLike)):
            if isinstance(image, Image.Image):
                img = upright(image, self.exif_transpose)
            else:
                img = _array_image(image)
            return encode(resize_shorter(to_rgb(img), size, **self.resize), fmt, quality)
        path = os.path.abspath(image)
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise ValueError("empty file (0 bytes)")
        try:
            img = decode_rgb(path, self.max_pixels, self.exif_transpose)
            return encode(resize_shorter(img, size, **self.resize), fmt, quality)
        except Exception as e:  # noqa: BLE001 -- any decoder failure is one line
            raise ValueError(_reason(e)) from None

    def __call__(self, image) -> np.ndarray:
        """uint8 [crop, crop, 3] of a path, PIL image or uint8 array ([H, W] or [H, W, 1|3|4]).

        Raises:
          ValueError: one line, when the file cannot be decoded or the array is not an image.
        """
        size, fraction, resample = self.crop
        return np.asarray(center_crop(as_pil(self.stored_image(image)), size, fraction,
                                      resample))


def _reason(e: BaseException) -> str:
    reason = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {reason}"[:200]


def _array_image(array) -> Image.Image:
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (
            array.ndim == 3 and array.shape[-1] not in (1, 3, 4)) or 0 in array.shape[:2]:
        raise ValueError(f"an image array must be uint8 [H, W] or [H, W, 1|3|4] with H, W > 0, "
                         f"got {array.dtype} {array.shape}")
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """Inception-style random crop of area CROP_SCALE and ratio CROP_RATIO, resized to size."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = np.exp(rng.uniform(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1])))
        cw, ch = round(np.sqrt(target * ratio)), round(np.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            break
    else:  # fall back to the central square, as torchvision does
        cw = ch = min(w, h)
        x, y = (w - cw) // 2, (h - ch) // 2
    # One resize call with a box crops and resamples together (no intermediate copy).
    return img.resize((size, size), Image.BILINEAR, box=(x, y, x + cw, y + ch))


def center_crop(img: Image.Image, size: int, fraction: float = EVAL_CROP_FRACTION,
                resample: str = CROP_RESAMPLE) -> Image.Image:
    """Crops the central ``fraction`` of the shorter side and resizes it to ``size``.

    The box is (round(left), round(top), round(left + side), round(top + side)) with
    side = min(w, h) * fraction (Python's round: half to even); when the box is already
    size x size it is cut out, otherwise PIL resizes the box (crop and resample in one call).
    """
    w, h = img.size
    side = min(w, h) * fraction
    left, top = (w - side) / 2, (h - side) / 2
    box = (round(left), round(top), round(left + side), round(top + side))
    if box[2] - box[0] == size and box[3] - box[1] == size:
        return img.crop(box)
    return img.resize((size, size), RESAMPLE[resample], box=box)


def color_jitter(arr: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast and saturation factors in [1 - s, 1 + s] on a uint8 image."""
    x = arr.astype(np.float32)
    b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
    x = x * b
    x = (x - x.mean()) * c + x.mean()
    grey = x.mean(axis=-1, keepdims=True)
    x = (x - grey) * s + grey
    return np.clip(x, 0, 255).astype(np.uint8)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


class TrainTransform:
    """Per-example training augmentation for grain's ``random_map``.

    The rng grain passes is derived from the dataset seed and the element's position, so the
    augmentation of an example does not depend on worker count or on which worker runs it.
    """

    def __init__(self, image_size: int, jitter: float = 0.0):
        self.image_size = image_size
        self.jitter = jitter

    def __call__(self, element: dict, rng: np.random.Generator) -> dict:
        img = random_resized_crop(as_pil(element["image"]), self.image_size, rng)
        if rng.random() < 0.5:
            # PIL flips without the GIL and hands NumPy a contiguous array; a reversed NumPy
            # view would cost a strided copy per example (a third of the crop's time).
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(img)
        if self.jitter > 0:
            arr = color_jitter(arr, self.jitter, rng)
        return {"image": arr, "text": _text(element["text"]), "label": np.int32(element["label"])}


class EvalTransform:
    """Deterministic evaluation view: centre crop, no augmentation."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, element: dict) -> dict:
        img = center_crop(as_pil(element["image"]), self.image_size)
        out = {"image": np.asarray(img), "text": _text(element["text"]),
               "label": np.int32(element["label"])}
        for key in ("mask", "index"):
            if key in element:
                out[key] = element[key]
        return out


class TokenizeBatch:
    """Replaces a batch's ``text`` by fixed-length input_ids and attention_mask (int32).

    One tokenizer call per batch: the fast tokenizer's batched encode runs in Rust and costs less
    than half as much per text as per-example calls (0.8 vs 1.8 ms per 32 texts measured). It runs
    in the main process after the worker hop, so workers never import transformers.
    """

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, batch: dict) -> dict:
        enc = self.tokenizer([str(t) for t in batch.pop("text")], padding="max_length",
                             truncation=True, max_length=self.max_length, return_tensors="np")
        batch["input_ids"] = enc["input_ids"].astype(np.int32)
        batch["attention_mask"] = enc["attention_mask"].astype(np.int32)
        return batch
