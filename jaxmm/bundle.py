"""An export bundle: a trained model in one folder that runs without jaxmm's model code.

    clf = jaxmm.Classifier.load("bundle")
    labels, probs = clf.predict(["photo.jpg"], ["plastic bottle"])

A bundle (written by ``python -m jaxmm.export``) holds, under the names in ``jaxmm.paths``:
``model.json`` (format version, architecture, class names, preprocessing, calibration, package
versions and the shape of every weight), ``weights.safetensors``, the tokenizer files and a
serialized ``jax.export`` function (StableHLO lowered for CPU and CUDA, symbolic batch size) that
maps (variables, uint8 images, token ids, attention mask) to logits.

The default engine runs that function: loading a bundle imports jax, numpy, PIL, safetensors and
tokenizers, but neither flax nor transformers nor any training package. The "model" engine
rebuilds the flax model from ``model.json`` instead (it needs jaxmm's model code). Images are
preprocessed exactly like evaluation: prepare's decode + RGB + shorter-side resize + re-encode at
the stored size, then the evaluation centre crop.
"""

import os
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from PIL import Image

from jaxmm import paths
from jaxmm.data import captions, transforms
from jaxmm.errors import BundleError, ConfigError

FORMAT = "jaxmm-bundle"
FORMAT_VERSION = 1
ENGINES = ("exported", "model")
_SPEC_KEYS = ("class_names", "architecture", "preprocessing", "weights", "function")


def _reason(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def bundle_file(bundle_dir: str, name: str) -> str:
    """The path of a bundle file that must exist.

    Raises:
      BundleError: it is missing.
    """
    path = os.path.join(bundle_dir, name)
    if not os.path.exists(path):
        raise BundleError(f"{path}: missing; {bundle_dir} is not a complete jaxmm bundle")
    return path


def read_spec(bundle_dir: str) -> dict:
    """The bundle's ``model.json``, checked for its format and version.

    Raises:
      BundleError: no bundle folder, unreadable JSON, not a bundle, or a newer format version.
    """
    if not os.path.isdir(bundle_dir):
        raise BundleError(f"{bundle_dir}: no such bundle folder")
    path = bundle_file(bundle_dir, paths.BUNDLE_SPEC_FILE)
    import json

    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: not readable as JSON ({_reason(e)})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise BundleError(f'{path}: not a jaxmm bundle description (no "format": "{FORMAT}")')
    version = spec.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {version} is newer than this jaxmm "
                          f"reads ({FORMAT_VERSION}); upgrade jaxmm")
    missing = [k for k in _SPEC_KEYS if k not in spec]
    if missing:
        raise BundleError(f"{path}: missing fields {missing}")
    return spec


# --- Weights: nested variables <-> flat "params/image/conv1/kernel" tensors ------------------

def flatten(tree: Mapping, prefix: str = "") -> dict:
    """Nested dicts of arrays as one flat dict keyed by "/"-joined names."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unflatten(flat: Mapping) -> dict:
    """The inverse of ``flatten`` for model variables (``batch_stats`` exists even when empty)."""
    tree = {"params": {}, "batch_stats": {}}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def check_shapes(got: Mapping, want: Mapping, path: str, against: str) -> None:
    """Fails with one line when two {name: shape} tables differ.

    Args:
      got: shapes found in ``path``.
      want: the shapes ``against`` (e.g. model.json) asks for.
      path: the file the message names.
      against: what the shapes come from.

    Raises:
      BundleError: the first differing tensor, or how many are missing or unexpected.
    """
    got = {k: tuple(v) for k, v in got.items()}
    want = {k: tuple(v) for k, v in want.items()}
    if got == want:
        return
    wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if wrong:
        detail = f"tensor {wrong[0]} has shape {got[wrong[0]]}, {against} needs {want[wrong[0]]}"
    elif missing:
        detail = f"{len(missing)} tensors are missing, e.g. {missing[0]}"
    else:
        detail = f"{len(extra)} tensors are not in {against}, e.g. {extra[0]}"
    raise BundleError(f"{path}: does not fit {against}: {detail}")


def read_weights(bundle_dir: str, spec: dict) -> dict:
    """The model variables of a bundle as NumPy arrays, checked against model.json's shapes."""
    from safetensors.numpy import load_file

    path = bundle_file(bundle_dir, paths.BUNDLE_WEIGHTS_FILE)
    try:
        flat = load_file(path)
    except Exception as e:  # noqa: BLE001 -- any parse failure means "not a weights file"
        raise BundleError(f"{path}: not a readable safetensors file ({_reason(e)})") from None
    check_shapes({k: v.shape for k, v in flat.items()}, spec["weights"]["shapes"], path,
                 paths.BUNDLE_SPEC_FILE)
    return unflatten(flat)


# --- Inputs: images and texts exactly as evaluation sees them --------------------------------

class Tokenizer:
    """The bundle's tokenizer through the ``tokenizers`` library (no transformers import).

    Pads and truncates to a fixed length as ``transforms.TokenizeBatch`` does with the
    transformers tokenizer saved from the same files.
    """

    def __init__(self, bundle_dir: str, text: dict):
        from tokenizers import Tokenizer as RustTokenizer

        path = bundle_file(bundle_dir, os.path.join(paths.TOKENIZER_DIR, "tokenizer.json"))
        try:
            self._tok = RustTokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001
            raise BundleError(f"{path}: not a readable tokenizer ({_reason(e)})") from None
        length = int(text["max_text_length"])
        self._tok.enable_truncation(max_length=length)
        self._tok.enable_padding(length=length, pad_id=int(text["pad_id"]),
                                 pad_token=text["pad_token"])

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int32 [n, max_text_length]."""
        encodings = self._tok.encode_batch([str(t) for t in texts])
        return (np.array([e.ids for e in encodings], np.int32),
                np.array([e.attention_mask for e in encodings], np.int32))


def image_view(pre: dict) -> transforms.RawView:
    """The model's view of raw images, from model.json's preprocessing."""
    if pre["crop_fraction"] != transforms.EVAL_CROP_FRACTION:
        raise BundleError(f"{paths.BUNDLE_SPEC_FILE}: crop fraction {pre['crop_fraction']} is "
                          f"not this jaxmm's ({transforms.EVAL_CROP_FRACTION})")
    return transforms.RawView(pre["stored_size"], pre["stored_format"], pre["jpeg_quality"],
                              pre["max_pixels"], pre["crop_size"])


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Float32 class probabilities of float logits divided by a temperature."""
    z = np.asarray(logits, np.float64) / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


def default_cache_dir(bundle_dir: str) -> str:
    """``<bundle>/jax_cache`` when the bundle folder is writable, else a per-user cache folder."""
    if os.access(bundle_dir, os.W_OK):
        return os.path.join(bundle_dir, paths.JAX_CACHE_DIR)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "jaxmm", paths.JAX_CACHE_DIR)


def enable_compilation_cache(cache_dir: str) -> str | None:
    """Turns on JAX's persistent compilation cache in ``cache_dir`` (every compilation cached).

    Call before the first compilation of the process. A cache the user configured already
    (``JAX_COMPILATION_CACHE_DIR`` or jax.config) is kept. Returns the folder in use, or None.
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current or not cache_dir:
        return current or None
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError:
        return None  # a read-only place: run without a cache rather than fail
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Inference compiles little; caching even the short compilations makes the next start fast.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return cache_dir


# --- Running a bundle ----------------------------------------------------------------------------

def exported_logits(bundle_dir: str, spec: dict):
    """The bundle's deserialized StableHLO function, jitted: (variables, image, ids, mask)."""
    import jax
    from jax import export

    path = bundle_file(bundle_dir, paths.BUNDLE_FUNCTION_FILE)
    try:
        with open(path, "rb") as f:
            function = export.deserialize(bytearray(f.read()))
    except Exception as e:  # noqa: BLE001 -- a corrupt or foreign file
        raise BundleError(f"{path}: not a serialized jax.export function ({_reason(e)})") from None
    (variables, *_), _ = jax.tree_util.tree_unflatten(function.in_tree, function.in_avals)
    check_shapes({k: a.shape for k, a in flatten(variables).items()},
                 spec["weights"]["shapes"], path, paths.BUNDLE_SPEC_FILE)
    return jax.jit(function.call)


def build_model(architecture: dict, num_classes: int):
    """The flax model ``model.json``'s architecture describes (inference only: no pmap axis)."""
    import jax.numpy as jnp
    from transformers import DistilBertConfig

    from jaxmm.models.fusion import MultimodalClassifier

    fields = dict(architecture)
    text = fields.pop("text_config")
    return MultimodalClassifier(
        num_classes=num_classes, modalities=tuple(fields.pop("modalities")),
        dtype=jnp.dtype(fields.pop("dtype")), axis_name=None,
        text_config=DistilBertConfig.from_dict(text) if text else None, **fields)


def model_logits(bundle_dir: str, spec: dict):
    """The flax model rebuilt from model.json, jitted: (variables, image, ids, mask)."""
    import functools

    import jax

    from jaxmm import models

    model = build_model(spec["architecture"], len(spec["class_names"]))
    pre = spec["preprocessing"]
    expected = jax.eval_shape(lambda: models.init_variables(
        model, jax.random.PRNGKey(0), pre["crop_size"], pre["text"]["max_text_length"]))
    check_shapes({k: a.shape for k, a in flatten(expected).items()}, spec["weights"]["shapes"],
                 os.path.join(bundle_dir, paths.BUNDLE_SPEC_FILE), "its architecture")
    return jax.jit(functools.partial(model.apply, train=False))


class Predictions(NamedTuple):
    """What ``Classifier.predict`` returns: one label and one probability row per image."""

    labels: list
    probs: np.ndarray  # float32 [n, num_classes], in the order of Classifier.class_names


class Classifier:
    """A bundle ready to classify images (+ texts) on the default JAX device."""

    def __init__(self, bundle_dir: str, spec: dict, logits_fn, variables: dict,
                 batch_size: int, temperature: float):
        import jax

        pre = spec["preprocessing"]
        self.bundle_dir, self.spec, self.batch_size = bundle_dir, spec, batch_size
        self.class_names = list(spec["class_names"])
        self.temperature = temperature
        self.view = image_view(pre)
        self.tokenize = Tokenizer(bundle_dir, pre["text"])
        self._logits = logits_fn
        self._variables = jax.device_put(variables)

    @classmethod
    def load(cls, bundle_dir: str, *, engine: str = "exported", batch_size: int = 16,
             calibrated: bool = True, cache_dir: str | None = None) -> "Classifier":
        """Loads a bundle written by ``python -m jaxmm.export``.

        Args:
          bundle_dir: the bundle folder.
          engine: "exported" (the serialized StableHLO function) or "model" (the flax model
            rebuilt from model.json; needs jaxmm's model code).
          batch_size: most images per forward pass; smaller calls are padded to a power of two.
          calibrated: divide the logits by the bundle's fitted temperature, if it has one.
          cache_dir: persistent compilation cache; None = ``default_cache_dir``, "" = off.

        Raises:
          BundleError: one line naming the missing, unreadable or mismatched file.
        """
        if engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
        spec = read_spec(bundle_dir)
        enable_compilation_cache(default_cache_dir(bundle_dir) if cache_dir is None
                                 else cache_dir)
        try:
            variables = read_weights(bundle_dir, spec)
            fn = (exported_logits if engine == "exported" else model_logits)(bundle_dir, spec)
            temperature = float((spec.get("calibration") or {}).get("temperature", 1.0))
            return cls(bundle_dir, spec, fn, variables, batch_size,
                       temperature if calibrated else 1.0)
        except (KeyError, TypeError) as e:
            raise BundleError(f"{os.path.join(bundle_dir, paths.BUNDLE_SPEC_FILE)}: missing or "
                              f"malformed field {_reason(e)}") from None

    def texts_for(self, images: list, texts) -> list[str]:
        """Per-image texts: given, one for all, or the file-name rule ('' for in-memory images)."""
        if isinstance(texts, str):
            return [texts] * len(images)
        if texts is None:
            return [captions.text_from_filename(os.fspath(i))
                    if isinstance(i, (str, os.PathLike)) else "" for i in images]
        texts = list(texts)
        if len(texts) != len(images):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        return texts

    def predict(self, images, texts=None) -> Predictions:
        """Classifies images (paths, PIL images or uint8 arrays) with their texts.

        Args:
          images: a list of images (or one image).
          texts: a list of strings, one string for every image, or None for the file-name rule.

        Raises:
          ValueError: naming the first image that cannot be read.
        """
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]
        images, texts = list(images), self.texts_for(list(images), texts)
        crops = []
        for i, image in enumerate(images):
            try:
                crops.append(self.view(image))
            except ValueError as e:
                name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"#{i}"
                raise ValueError(f"image {name}: {e}") from None
        probs = self.probabilities(crops, texts)
        return Predictions([self.class_names[k] for k in probs.argmax(-1)], probs)

    def read(self, path: str, text: str) -> dict:
        """The model's view of one file (``classify.predict_files`` calls it).

        Raises ValueError (one line) when it cannot be read."""
        return {"image": self.view(path), "text": text}

    def __call__(self, examples: list[dict]) -> np.ndarray:
        """Class probabilities [n, K] of ``read`` results."""
        return self.probabilities([e["image"] for e in examples], [e["text"] for e in examples])

    def probabilities(self, crops: list[np.ndarray], texts: list[str]) -> np.ndarray:
        """Class probabilities [n, K] of preprocessed crops; one compilation per padded size."""
        out = []
        for start in range(0, len(crops), self.batch_size):
            image = np.stack(crops[start:start + self.batch_size])
            ids, mask = self.tokenize(texts[start:start + self.batch_size])
            n = len(image)
            size = min(self.batch_size, 1 << (n - 1).bit_length())
            image, ids, mask = (_pad(x, size) for x in (image, ids, mask))
            logits = self._logits(self._variables, image, ids, mask)
            out.append(softmax(np.asarray(logits)[:n], self.temperature))
        width = len(self.class_names)
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    # Repeats the first row: a few batch sizes, each compiled (and cached) once.
    return np.concatenate([x, np.repeat(x[:1], size - len(x), 0)])
