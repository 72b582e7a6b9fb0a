"""Turning request bodies into images and texts, with a clear error for every bad input.

Every problem is an ``InputProblem``: an HTTP status and one line naming the part of the request
(``image[2]``, ``texts``). Images are decoded from memory only; a file name that comes with an
upload is used for its text (the bundle's file-name rule), never opened.
"""

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError


class InputProblem(Exception):
    """A request the server refuses: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _reason(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:160]


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) that a PNG, GIF or BMP header declares, read without Pillow (which
    refuses a zero-sized image as "not an image"), or None for other data."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:2] == b"BM" and len(data) >= 26:
        return (int.from_bytes(data[18:22], "little", signed=True),
                abs(int.from_bytes(data[22:26], "little", signed=True)))
    return None


def decode_image(data: bytes, what: str, max_pixels: int) -> Image.Image:
    """The decoded image of an upload.

    Args:
      data: the file's bytes.
      what: how the answer names it (``image[0]``, or its file name).
      max_pixels: larger images are refused before they are decoded (decompression bombs).

    Raises:
      InputProblem: 415 not an image format Pillow reads; 400 empty, zero pixels, too many
        pixels, truncated or corrupt.
    """
    if not data:
        raise InputProblem(400, f"{what}: empty file (0 bytes)")
    declared = header_size(data)
    if declared is not None and min(declared) <= 0:
        raise InputProblem(400, f"{what}: the image has zero pixels ({declared[0]}x"
                                f"{declared[1]})")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputProblem(415, f"{what}: not an image (Pillow reads PNG, JPEG, WebP, GIF, "
                                "BMP, TIFF)") from None
    except Image.DecompressionBombError:
        raise InputProblem(400, f"{what}: too many pixels (a decompression bomb?)") from None
    except Exception as e:  # noqa: BLE001 -- a broken header is one line, whatever the plugin
        raise InputProblem(400, f"{what}: not a readable image ({_reason(e)})") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InputProblem(400, f"{what}: the image has zero pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputProblem(400, f"{what}: {width}x{height} is more than {max_pixels:,} pixels "
                                "(a decompression bomb?); send a smaller photo")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 -- truncated or corrupt data
        raise InputProblem(400, f"{what}: truncated or corrupt image ({_reason(e)})") from None
    return img


def decode_base64(text, what: str) -> bytes:
    """The bytes of a base64 string (a ``data:...;base64,`` prefix is allowed).

    Raises:
      InputProblem: 422 when it is not a string of valid base64.
    """
    if not isinstance(text, str):
        raise InputProblem(422, f"{what}: must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputProblem(422, f"{what}: not valid base64 ({_reason(e)})") from None


def texts_for(count: int, texts, what: str = "texts") -> list:
    """One text (or None) per image: none given, one per image, or one for all.

    Raises:
      InputProblem: 422 for a text that is not a string or a count that fits no rule.
    """
    if texts is None:
        return [None] * count
    if isinstance(texts, str):
        return [texts] * count
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputProblem(422, f"{what}[{i}]: must be a string, got {type(t).__name__}")
    if len(texts) == 1:
        return texts * count
    if len(texts) != count:
        raise InputProblem(422, f"{what}: {len(texts)} texts for {count} images (give none, "
                                "one for all, or one per image)")
    return texts
