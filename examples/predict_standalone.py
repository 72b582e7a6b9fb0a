"""A reference client of a jaxmm export bundle that needs no jaxmm.

    python examples/predict_standalone.py BUNDLE IMAGE... [--text T ...]

It reads only the bundle (model.json, weights.safetensors, tokenizer/tokenizer.json,
predict.jaxexport) and uses only jax, numpy, safetensors, pillow and tokenizers (jax.export needs
flatbuffers to deserialize the function). Everything it does to an image and a text is what
model.json's "model.preprocessing" says; docs/bundle.md describes each field. It prints one JSON
line per image: {"file": ..., "text": ..., "probabilities": {class: p, ...}}.

With one --text, every image gets it; with as many as images, one each; without, each image's
text comes from its file name by the recorded text rule.
"""

import argparse
import io
import json
import os
import re
import sys
import warnings

import numpy as np
from PIL import Image, ImageOps

FORMAT, FORMAT_VERSION = "jaxmm-bundle", 2


# --- model.json ----------------------------------------------------------------------------------

def read_bundle(bundle_dir):
    with open(os.path.join(bundle_dir, "model.json"), encoding="utf-8") as f:
        record = json.load(f)
    if record.get("format") != FORMAT or record.get("format_version") != FORMAT_VERSION:
        sys.exit(f"{bundle_dir}: not a jaxmm bundle of format {FORMAT_VERSION}")
    return record


# --- image: decode, RGB, stored image, centre crop -----------------------------------------------

RESAMPLE = {"nearest": Image.NEAREST, "box": Image.BOX, "bilinear": Image.BILINEAR,
            "hamming": Image.HAMMING, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


def decode(source, max_pixels):
    """Fully decodes an image; more than max_pixels pixels is refused (a decompression bomb)."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            img.load()
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return img


def to_rgb(img):
    """8-bit RGB: 16-bit and 32-bit grey rescaled to 0..255, palette transparency through RGBA,
    then PIL's convert("RGB") (which drops an alpha channel)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def stored_image(img, pre):
    """The image as prepare stored it for training: shorter side resized, longer side bounded,
    re-encoded."""
    size = pre["stored_size"]
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if nw * nh > pre["max_pixels"]:
        raise ValueError(f"a {w}x{h} image resizes to {nw}x{nh}, over {pre['max_pixels']} pixels")
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), RESAMPLE[pre["resize_resample"]],
                         reducing_gap=pre["resize_reducing_gap"])
    limit = round(pre["max_aspect"] * size)
    if max(nw, nh) > limit:
        left, top = (nw - min(nw, limit)) // 2, (nh - min(nh, limit)) // 2
        img = img.crop((left, top, left + min(nw, limit), top + min(nh, limit)))
    buf = io.BytesIO()
    if pre["stored_format"] == "jpeg":
        img.save(buf, format="JPEG", quality=pre["jpeg_quality"])
    else:
        img.save(buf, format="PNG")
    return to_rgb(Image.open(io.BytesIO(buf.getvalue())))


def centre_crop(img, pre):
    size, w, h = pre["crop_size"], *img.size
    side = min(w, h) * pre["crop_fraction"]
    left, top = (w - side) / 2, (h - side) / 2
    box = (round(left), round(top), round(left + side), round(top + side))
    if box[2] - box[0] == size and box[3] - box[1] == size:
        return img.crop(box)
    return img.resize((size, size), RESAMPLE[pre["crop_resample"]], box=box)


def image_input(path, pre):
    img = decode(path, pre["max_pixels"])
    if pre.get("exif_transpose", False):  # absent in bundles written before the field existed
        img = ImageOps.exif_transpose(img)
    img = to_rgb(img)
    return np.asarray(centre_crop(stored_image(img, pre), pre), np.uint8)


# --- text ----------------------------------------------------------------------------------------

def text_from_file_name(path, rule):
    text = os.path.splitext(os.path.basename(path))[0]
    for op, *args in rule:
        if op == "lower":
            text = text.lower()
        elif op == "strip":
            text = text.strip()
        elif op == "replace":
            text = text.replace(args[0], args[1])
        elif op == "regex_sub":
            text = re.sub(args[0], args[1], text)
        else:
            sys.exit(f"unknown text-rule step {op!r}")
    return text


def tokenizer_of(bundle_dir, record):
    from tokenizers import Tokenizer

    entry = record["tokenizer"]
    tok = Tokenizer.from_file(os.path.join(bundle_dir, entry["file"]))
    tok.enable_truncation(max_length=entry["truncate_to"])
    tok.enable_padding(length=entry["pad_to"], pad_id=entry["pad_id"],
                       pad_token=entry["pad_token"])
    return tok


# --- the function --------------------------------------------------------------------------------

def variables_of(bundle_dir, record):
    """The weights file's tensors nested by their "/"-separated names."""
    from safetensors.numpy import load_file

    tree = {"params": {}, "batch_stats": {}}
    for name, value in load_file(os.path.join(bundle_dir, record["weights"]["file"])).items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def predict(bundle_dir, images, texts):
    from jax import export

    record = read_bundle(bundle_dir)
    model = record["model"]
    pre = model["preprocessing"]
    with open(os.path.join(bundle_dir, record["function"]["file"]), "rb") as f:
        function = export.deserialize(bytearray(f.read()))
    encodings = tokenizer_of(bundle_dir, record).encode_batch(texts)
    args = (variables_of(bundle_dir, record),
            np.stack([image_input(path, pre) for path in images]),
            np.array([e.ids for e in encodings], np.int32),
            np.array([e.attention_mask for e in encodings], np.int32))
    logits = np.asarray(function.call(*args), np.float64)
    temperature = (model.get("calibration") or {}).get("temperature", 1.0)
    z = logits / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32), model["class_names"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--text", action="append", default=None)
    args = parser.parse_args(argv)
    record = read_bundle(args.bundle)
    rule = record["model"]["preprocessing"]["text_rule"]
    texts = args.text or [text_from_file_name(p, rule) for p in args.images]
    if len(texts) == 1:
        texts = texts * len(args.images)
    if len(texts) != len(args.images):
        parser.error(f"{len(args.images)} images but {len(texts)} texts")
    probs, names = predict(args.bundle, args.images, texts)
    for path, text, p in zip(args.images, texts, probs, strict=True):
        print(json.dumps({"file": path, "text": text,
                          "probabilities": {c: float(v) for c, v in zip(names, p, strict=True)}}))


if __name__ == "__main__":
    main()
