"""Images shared between splits: exact copies and near copies.

Prepare hashes every image while it encodes it (in the decode workers, from the small stored
image, so it costs no extra pass over the data and well under a millisecond per image):
- an *exact* hash of the stored RGB pixels and the original size (equal for pixel-identical
  files, whatever their format or name);
- a 64-bit *perceptual* hash of the stored image (DCT of a 32x32 grey thumbnail, low frequencies
  against their median), which survives resizing and re-encoding, and a 16x16 RGB thumbnail.
Two images are a near copy when their perceptual hashes differ in at most
``MAX_DISTANCE`` bits and their thumbnails differ by at most ``MAX_RMS`` grey levels (root mean
square); the thumbnail check removes the look-alikes a grey 64-bit hash cannot tell apart.
Copies across splits inflate test scores; copies within a split (``find_within``) matter when
they carry different labels, which the label audit reports.

This module imports only NumPy and PIL: the decode workers import it.
"""

import hashlib
import os

import numpy as np
from PIL import Image

from jaxmm.data import transforms

THUMB_SIDE = 32  # grey thumbnail the DCT runs on
LOW_FREQ = 8  # 8x8 lowest frequencies -> 64 bits
COLOUR_SIDE = 16  # RGB thumbnail of the confirmation step
# Measured on the 364 demo images (smooth, low-contrast look-alikes, harder than photos) stored
# at 48 and 80 px, against copies resized to 30-100% and re-encoded as JPEG q50-q90: copies differ
# in at most 6 hash bits and 5.7 RMS levels; distinct images with <= 10 differing bits (141
# pairs) differ by 28 RMS levels or more.
MAX_DISTANCE = 8
MAX_RMS = 12.0
SPLIT_ORDER = ("train", "validation", "test")


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    return np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n))


_DCT = _dct_matrix(THUMB_SIDE)


def perceptual_hash(img: Image.Image) -> int:
    """64-bit pHash of an image: DCT low frequencies above their median (DC term left out)."""
    grey = np.asarray(img.convert("L").resize((THUMB_SIDE, THUMB_SIDE), Image.BOX),
                      np.float64)
    low = (_DCT @ grey @ _DCT.T)[:LOW_FREQ, :LOW_FREQ].ravel()
    bits = low > np.median(low[1:])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def thumbnail(img: Image.Image) -> bytes:
    """16x16 RGB thumbnail (uint8 bytes) for confirming a near copy."""
    return img.resize((COLOUR_SIDE, COLOUR_SIDE), Image.BOX).tobytes()


def thumbnail_rms(a: bytes, b: bytes) -> float:
    """Root-mean-square difference of two thumbnails, in grey levels (0-255)."""
    x = np.frombuffer(a, np.uint8).astype(np.float32) - np.frombuffer(b, np.uint8)
    return float(np.sqrt(np.mean(x * x)))


def exact_hash(stored: Image.Image, original_size: tuple[int, int]) -> str:
    """Digest of the stored RGB pixels and the original size (equal for pixel-identical files)."""
    h = hashlib.sha256(f"{original_size} {stored.size}".encode())
    h.update(stored.tobytes())
    return h.hexdigest()


def encode_and_hash(args: tuple) -> tuple[bytes | None, str, tuple | None]:
    """Pool worker of prepare: decodes, converts, resizes, encodes and hashes one file.

    Args:
      args: (path, stored shorter side, 'jpeg'|'png', jpeg quality, max pixels, apply the
        EXIF orientation).

    Returns:
      (encoded bytes, '', (exact hash, perceptual hash, thumbnail)) on success, or
      (None, reason, None) on any failure.
    """
    path, size, fmt, quality, max_pixels, exif_transpose = args
    try:
        if os.path.getsize(path) == 0:
            return None, "empty file (0 bytes)", None
        rgb = transforms.decode_rgb(path, max_pixels, exif_transpose)
        stored = transforms.resize_shorter(rgb, size, max_pixels=max_pixels)
        return (transforms.encode(stored, fmt, quality), "",
                (exact_hash(stored, rgb.size), perceptual_hash(stored), thumbnail(stored)))
    except Exception as e:  # noqa: BLE001 -- any decoder failure means "skip and report"
        reason = str(e).splitlines()[0] if str(e) else ""
        return None, f"{type(e).__name__}: {reason}"[:200], None


def _near_pairs(a: np.ndarray, b: np.ndarray, max_distance: int, block: int = 512):
    """(i, j, distance) for every a[i], b[j] within max_distance bits, blockwise."""
    for start in range(0, len(a), block):
        dist = np.bitwise_count(a[start:start + block, None] ^ b[None, :])
        for i, j in zip(*np.nonzero(dist <= max_distance), strict=True):
            yield start + int(i), int(j), int(dist[i, j])


def _split_pairs(ha: list[tuple], hb: list[tuple], max_distance: int,
                 max_rms: float) -> dict[tuple[int, int], tuple[str, int, float]]:
    """(i, j) -> (kind, hash distance, thumbnail RMS) for the copies between two splits.

    Equal stored pixels give equal perceptual hashes, so exact copies are among the candidates.
    """
    pa = np.array([h[2] for h in ha], np.uint64)
    pb = np.array([h[2] for h in hb], np.uint64)
    found = {}
    for i, j, d in _near_pairs(pa, pb, max_distance):
        rms = thumbnail_rms(ha[i][3], hb[j][3])
        if ha[i][1] == hb[j][1] or rms <= max_rms:
            found[(i, j)] = ("exact" if ha[i][1] == hb[j][1] else "near", d, rms)
    return found


def find_duplicates(hashes: dict[str, list[tuple]], max_distance: int = MAX_DISTANCE,
                    max_rms: float = MAX_RMS) -> dict:
    """Pairs of images in different splits that are exact or near copies of each other.

    Args:
      hashes: split -> [(file, exact hash, perceptual hash, thumbnail)] of the written images.
      max_distance: most perceptual-hash bits that may differ in a near copy.
      max_rms: largest thumbnail difference (RMS grey levels) of a near copy.

    Returns:
      dict(max_distance, max_rms, exact=n, near=n, counts={"train/test": n, ...}, pairs=[dict(
      kind='exact'|'near', splits=[a, b], files=[file_a, file_b], distance=bits, rms=levels),
      ...]), split a before split b in train, validation, test order.
    """
    splits = [s for s in SPLIT_ORDER if s in hashes] + sorted(set(hashes) - set(SPLIT_ORDER))
    pairs, counts = [], {}
    for ia, sa in enumerate(splits):
        for sb in splits[ia + 1:]:
            ha, hb = hashes[sa], hashes[sb]
            found = _split_pairs(ha, hb, max_distance, max_rms) if ha and hb else {}
            for (i, j), (kind, d, rms) in sorted(found.items()):
                pairs.append({"kind": kind, "splits": [sa, sb], "files": [ha[i][0], hb[j][0]],
                              "distance": d, "rms": round(rms, 2)})
            if found:
                counts[f"{sa}/{sb}"] = len(found)
    exact = sum(p["kind"] == "exact" for p in pairs)
    return {"max_distance": max_distance, "max_rms": max_rms, "exact": exact,
            "near": len(pairs) - exact, "counts": counts, "pairs": pairs}


def find_within(hashes: dict[str, list[tuple]], max_distance: int = MAX_DISTANCE,
                max_rms: float = MAX_RMS) -> dict:
    """Pairs of images of the same split that are exact or near copies of each other.

    Args:
      hashes: as for ``find_duplicates``.

    Returns:
      dict(counts={split: n}, pairs=[dict(kind, split, files=[a, b], distance, rms)]), a before
      b in the split's order.
    """
    pairs, counts = [], {}
    for split in [s for s in SPLIT_ORDER if s in hashes] + sorted(set(hashes) - set(SPLIT_ORDER)):
        h = hashes[split]
        found = {k: v for k, v in (_split_pairs(h, h, max_distance, max_rms) if h else {}).items()
                 if k[0] < k[1]}
        for (i, j), (kind, d, rms) in sorted(found.items()):
            pairs.append({"kind": kind, "split": split, "files": [h[i][0], h[j][0]],
                          "distance": d, "rms": round(rms, 2)})
        if found:
            counts[split] = len(found)
    return {"counts": counts, "pairs": pairs}


def summary_line(duplicates: dict) -> str:
    """One line about the cross-split copies of a prepare report."""
    if not duplicates["pairs"]:
        return "  duplicates across splits: none (same pixels, or near copies by perceptual hash)"
    per = ", ".join(f"{k} {n}" for k, n in duplicates["counts"].items())
    return (f"  duplicates across splits: {duplicates['exact']} exact, {duplicates['near']} near "
            f"(distance <= {duplicates['max_distance']}): {per}; pairs in the report")


def within_line(within: dict) -> str:
    """One line about the copies within splits (``find_within``)."""
    per = ", ".join(f"{k} {n}" for k, n in within["counts"].items()) or "none"
    return f"  copies within a split: {per} (the label audit reports those with other labels)"


def files_with_copy_in(duplicates: dict, split: str, other: str) -> set[str]:
    """Files of ``split`` that have an exact or near copy in ``other``."""
    out = set()
    for p in duplicates.get("pairs", []):
        for k in (0, 1):
            if p["splits"][k] == split and p["splits"][1 - k] == other:
                out.add(p["files"][k])
    return out
