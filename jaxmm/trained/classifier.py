"""Running an export bundle: ``jaxmm.Classifier``.

    clf = jaxmm.Classifier.load("bundle")
    labels, probs = clf.predict(["photo.jpg"], ["plastic bottle"])

The default engine runs the bundle's exported function: loading imports jax, numpy, PIL,
safetensors and tokenizers, but neither flax nor transformers nor any training package. The
"model" engine rebuilds the flax model from model.json instead (it needs jaxmm's model code).
Inputs go through the bundle's recorded ``Preprocessing``, exactly as evaluation sees them.
"""

import functools
import logging
import os
from typing import NamedTuple

import numpy as np
from PIL import Image

from jaxmm import paths
from jaxmm.errors import BundleError, ConfigError
from jaxmm.trained import bundle
from jaxmm.trained.model import padded_batches

ENGINES = ("exported", "model")
log = logging.getLogger("jaxmm")


class Tokenizer:
    """The bundle's tokenizer through the ``tokenizers`` library (no transformers import): pads
    and truncates to the recorded length as training's transformers tokenizer does."""

    def __init__(self, bundle_dir: str, record: dict):
        from tokenizers import Tokenizer as RustTokenizer

        path = bundle.bundle_file(bundle_dir, os.path.join(paths.TOKENIZER_DIR, "tokenizer.json"))
        try:
            self._tok = RustTokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001
            raise BundleError(f"{path}: not a readable tokenizer ({bundle._reason(e)})") from None
        spec = bundle.spec_of(record)
        length = spec.preprocessing.max_text_length
        entry = record["tokenizer"]
        rows = (spec.architecture.get("text_config") or {}).get("vocab_size")
        if rows is not None and self._tok.get_vocab_size() > rows:
            raise BundleError(f"{path}: {self._tok.get_vocab_size()} token ids, but the text "
                              f"tower's embedding has {rows} rows (model.architecture."
                              "text_config.vocab_size): another model's tokenizer")
        self._tok.enable_truncation(max_length=length)
        self._tok.enable_padding(length=length, pad_id=entry["pad_id"],
                                 pad_token=entry["pad_token"])

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray, bool]:
        """(input_ids, attention_mask) int32 [max_text_length] of one text, and whether the
        text was cut to fit (it is truncated as in training)."""
        e = self._tok.encode(str(text))
        return (np.array(e.ids, np.int32), np.array(e.attention_mask, np.int32),
                bool(e.overflowing))

    def decode(self, ids) -> str:
        """The text that ids stand for, special tokens left out."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_strings(self, ids) -> list[str]:
        """The token string of every id."""
        return [self._tok.id_to_token(int(i)) for i in ids]

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int32 [n, max_text_length]."""
        encodings = self._tok.encode_batch([str(t) for t in texts])
        return (np.array([e.ids for e in encodings], np.int32),
                np.array([e.attention_mask for e in encodings], np.int32))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Float32 class probabilities of logits divided by a temperature (computed in float64)."""
    z = np.asarray(logits, np.float64) / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


def default_cache_dir() -> str:
    """A per-user compilation cache (never inside the bundle: a bundle carries no native code
    that its loader would execute)."""
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


def exported_logits(bundle_dir: str, record: dict):
    """The bundle's deserialized StableHLO function, jitted: (variables, image, ids, mask)."""
    import jax
    from jax import export

    path = bundle.bundle_file(bundle_dir, record["function"]["file"])
    try:
        with open(path, "rb") as f:
            function = export.deserialize(bytearray(f.read()))
    except Exception as e:  # noqa: BLE001 -- a corrupt or foreign file
        raise BundleError(f"{path}: not a serialized jax.export function "
                          f"({bundle._reason(e)})") from None
    (variables, image, ids, _), _ = jax.tree_util.tree_unflatten(function.in_tree,
                                                                 function.in_avals)
    bundle.check_tensors(bundle.tensor_table(bundle.flatten(variables)),
                         record["weights"]["tensors"], path, paths.BUNDLE_SPEC_FILE)
    spec = bundle.spec_of(record)
    pre = spec.preprocessing
    if tuple(image.shape[1:]) != (pre.crop_size, pre.crop_size, 3) or \
            ids.shape[1] != pre.max_text_length:
        raise BundleError(f"{path}: takes images {list(image.shape[1:])} and {ids.shape[1]} "
                          f"tokens, {paths.BUNDLE_SPEC_FILE} says crop_size {pre.crop_size} and "
                          f"max_text_length {pre.max_text_length}")
    outputs = function.out_avals[0].shape[-1]
    if outputs != len(spec.class_names):
        raise BundleError(f"{path}: gives {outputs} logits, {paths.BUNDLE_SPEC_FILE} names "
                          f"{len(spec.class_names)} classes in model.class_names")
    return jax.jit(function.call)


def model_logits(bundle_dir: str, record: dict):
    """The flax model rebuilt from model.json, jitted: (variables, image, ids, mask)."""
    import jax

    spec = bundle.spec_of(record)
    try:
        model = spec.build_model()
    except ValueError as e:
        raise BundleError(f"{os.path.join(bundle_dir, paths.BUNDLE_SPEC_FILE)}: {e}") from None
    expected = bundle.tensor_table(bundle.flatten(spec.abstract_variables(model)))
    # The head's width follows class_names, so a wrong class count shows as a shape here.
    bundle.check_tensors(record["weights"]["tensors"], expected,
                         os.path.join(bundle_dir, paths.BUNDLE_SPEC_FILE), "its architecture")
    return jax.jit(functools.partial(model.apply, train=False))


def padded_sizes(batch_size: int) -> list[int]:
    """The batch shapes a batch of at most ``batch_size`` is padded to: the powers of two up to
    ``batch_size``, and ``batch_size`` (one compilation each)."""
    return sorted({1 << k for k in range(batch_size.bit_length()) if 1 << k <= batch_size}
                  | {batch_size})


class Predictions(NamedTuple):
    """What ``Classifier.predict`` returns: one label and one probability row per image."""

    labels: list
    probs: np.ndarray  # float32 [n, num_classes], in the order of Classifier.class_names


class Classifier:
    """A bundle ready to classify images (+ texts) on the default JAX device."""

    def __init__(self, bundle_dir: str, record: dict, logits_fn, variables: dict,
                 batch_size: int, temperature: float):
        import jax

        self.bundle_dir, self.record, self.batch_size = bundle_dir, record, batch_size
        self.spec = bundle.spec_of(record)
        self.class_names = list(self.spec.class_names)
        self.model_id = record.get("model_id")
        self.temperature = temperature
        self.view = self.spec.preprocessing.image_view()
        self.tokenize = Tokenizer(bundle_dir, record)
        self._logits = logits_fn
        self._variables = jax.device_put(variables)

    @classmethod
    def load(cls, bundle_dir: str, *, engine: str = "exported", batch_size: int = 16,
             calibrated: bool = True, cache_dir: str | None = None) -> "Classifier":
        """Loads a bundle written by ``python -m jaxmm.export``, checking every field of
        model.json and every content digest.

        Args:
          bundle_dir: the bundle folder.
          engine: "exported" (the serialized StableHLO function) or "model" (the flax model
            rebuilt from model.json; needs jaxmm's model code).
          batch_size: most images per forward pass; smaller calls are padded to a power of two.
          calibrated: divide the logits by the bundle's fitted temperature, if it has one.
          cache_dir: persistent compilation cache; None = ``default_cache_dir()``, "" = off.

        Raises:
          BundleError: one line naming the missing, unreadable or mismatched file.
        """
        if engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        record = bundle.read_record(bundle_dir)
        enable_compilation_cache(default_cache_dir() if cache_dir is None else cache_dir)
        variables = bundle.read_weights(bundle_dir, record)
        fn = (exported_logits if engine == "exported" else model_logits)(bundle_dir, record)
        temperature = bundle.spec_of(record).temperature if calibrated else None
        return cls(bundle_dir, record, fn, variables, batch_size, temperature or 1.0)

    def texts_for(self, images: list, texts) -> list[str]:
        """Per-image texts: given, one for all, or the file-name rule (an in-memory image has no
        file name: it gets the empty text, with a warning, since that changes the answer).

        Raises:
          ValueError: a text that is not a string, or not one text per image.
        """
        if isinstance(texts, str):
            return [texts] * len(images)
        if texts is None:
            unnamed = [i for i, image in enumerate(images)
                       if not isinstance(image, (str, os.PathLike))]
            if unnamed:
                log.warning("image(s) %s are in memory and have no file name: the empty text is "
                            "used; pass texts= to give each image its text", unnamed[:5])
            return [self.spec.preprocessing.text_of(os.fspath(i))
                    if isinstance(i, (str, os.PathLike)) else "" for i in images]
        texts = list(texts)
        wrong = [k for k, t in enumerate(texts) if not isinstance(t, str)]
        if wrong:
            raise ValueError(f"texts[{wrong[0]}] must be a string, got "
                             f"{type(texts[wrong[0]]).__name__}")
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
        images = list(images)
        texts = self.texts_for(images, texts)
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

    @property
    def variables(self) -> dict:
        """The model variables, on the device."""
        return self._variables

    def logits(self, image, input_ids, attention_mask) -> np.ndarray:
        """Float32 logits [n, K] of one prepared batch (each batch shape compiles once)."""
        return np.asarray(self._logits(self._variables, image, input_ids, attention_mask))

    def probabilities(self, crops: list[np.ndarray], texts: list[str]) -> np.ndarray:
        """Class probabilities [n, K] of preprocessed crops; one compilation per padded size
        (the powers of two up to ``batch_size``, and ``batch_size``)."""
        out = []
        for chunk, padded in padded_batches(list(zip(crops, texts, strict=True)),
                                            self.batch_size, padded_sizes(self.batch_size)):
            ids, mask = self.tokenize([t for _, t in padded])
            logits = self.logits(np.stack([c for c, _ in padded]), ids, mask)
            out.append(softmax(logits[:len(chunk)], self.temperature))
        width = len(self.class_names)
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)
