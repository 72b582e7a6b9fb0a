"""The trained model: what it is (``ModelSpec``), how raw inputs reach it (``Preprocessing``) and
the model with its weights and tokenizer (``TrainedModel``).

A ``ModelSpec`` has one JSON form, written into a training workdir's run record and into an
export bundle's ``model.json`` alike, and read back by the same ``ModelSpec.from_json``:

- ``class_names``: the outputs, in logit order.
- ``architecture``: the constructor fields of ``models.fusion.MultimodalClassifier``, taken from
  the module's own dataclass fields (a new hyper-parameter there is recorded without touching
  this file), less flax's own fields, the class count and the BatchNorm axis and implementation.
- ``preprocessing``: a ``Preprocessing``, the one description of how a raw image file and its
  text become model input. jaxmm builds its raw-image view from it (``image_view``) and nothing
  else; an export bundle records it so that a client in any language can repeat it exactly.
- ``calibration``: the temperature dividing the logits before the softmax, or null.

Importing this module is cheap (no jax, flax or transformers): the bundle's light path reads
specs. Building the model imports flax.
"""

import dataclasses
from typing import Any

import numpy as np

from jaxmm.data import captions, transforms

SPEC_VERSION = 2
# MultimodalClassifier fields that are not part of the architecture: flax's own, the class count
# (the length of class_names), the BatchNorm axis and implementation, the stem's and the text
# attention's implementation (training-time settings: inference reads the running averages with
# flax's BatchNorm and runs the stem and the attention as written, whatever they are).
_NOT_ARCHITECTURE = ("parent", "name", "num_classes", "axis_name", "batchnorm_sync", "batchnorm",
                     "stem", "attention")
TEXT_SOURCES = captions.TEXT_SOURCES
# Temperatures a model may carry: twice the range the fit searches (0.02 to 50) on each side.
TEMPERATURE_RANGE = (0.01, 100.0)
IMAGE_FORMATS = ("jpeg", "png")


def _fail(where: str, key: str, problem: str):
    raise ValueError(f"{where}: {key} {problem}")


def _check(where: str, key: str, value, kind, low=None) -> None:
    """Type (bools are not numbers) and lower bound of one field."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if ok and isinstance(value, float) and not np.isfinite(value):
        ok = False
    if not ok:
        _fail(where, key, f"must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    if low is not None and value < low:
        _fail(where, key, f"must be >= {low}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a raw image file and its text become model input, exactly as evaluation does it.

    Image: decode (bounded by ``max_pixels``, which bounds the resized image too), turn upright
    by the EXIF orientation tag when ``exif_transpose`` (False for models trained before the
    field existed: their data was stored as decoded), convert to RGB, resize the shorter side to
    ``stored_size`` with ``resize_resample`` (PIL, ``reducing_gap``), cut the longer side to at
    most ``max_aspect`` x ``stored_size`` around the centre, re-encode as ``stored_format``
    (what prepare stored for training), decode again, then cut the central ``crop_fraction`` of
    the shorter side and resize it to ``crop_size`` square with ``crop_resample``
    (``transforms.center_crop`` gives the rounding). The model takes the result as uint8 RGB and
    normalises it itself.
    Text: a given text, or the file name through ``text_rule``; tokenized to ``max_text_length``
    ids (truncated, padded), with an attention mask.
    """

    stored_size: int
    crop_size: int
    max_text_length: int
    text_source: str = "filename"
    stored_format: str = "jpeg"
    jpeg_quality: int = transforms.EncodeOptions.quality
    max_pixels: int = transforms.EncodeOptions.max_pixels
    resize_resample: str = transforms.STORED_RESAMPLE
    resize_reducing_gap: float = transforms.STORED_REDUCING_GAP
    max_aspect: float = transforms.MAX_ASPECT
    crop_fraction: float = transforms.EVAL_CROP_FRACTION
    crop_resample: str = transforms.CROP_RESAMPLE
    text_rule: tuple = captions.FILENAME_RULE
    exif_transpose: bool = False

    def image_view(self) -> transforms.RawView:
        """The model's view of raw images (paths, PIL images, uint8 arrays)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("max_text_length", "text_source", "text_rule"):
            fields.pop(key)
        return transforms.RawView(**fields)

    def text_of(self, file_name: str) -> str:
        """The file-name text of an image, by ``text_rule``."""
        return captions.text_from_filename(file_name, self.text_rule)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["text_rule"] = [list(step) for step in self.text_rule]
        return out

    @classmethod
    def from_json(cls, obj, where: str) -> "Preprocessing":
        """Reads ``to_json``'s form, checking every field.

        Raises:
          ValueError: "<where>: preprocessing.<key> ..." for the first bad field.
        """
        if not isinstance(obj, dict):
            _fail(where, "preprocessing", f"must be an object, got {obj!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            _fail(where, f"preprocessing.{unknown[0]}", "is not a field this jaxmm knows")
        for key in ("stored_size", "crop_size", "max_text_length"):
            if key not in obj:
                _fail(where, f"preprocessing.{key}", "is missing")
        value = {**obj}
        if "text_rule" in value:
            rule = value["text_rule"]
            if not isinstance(rule, list) or not all(isinstance(s, list) and s for s in rule):
                _fail(where, "preprocessing.text_rule", f"must be a list of steps, got {rule!r}")
            value["text_rule"] = tuple(tuple(step) for step in rule)
        pre = cls(**value)
        pre.check(where)
        return pre

    def check(self, where: str) -> None:
        """Raises ValueError naming the first field that cannot work."""
        k = lambda name: f"preprocessing.{name}"  # noqa: E731
        for name in ("stored_size", "crop_size", "max_text_length", "jpeg_quality",
                     "max_pixels"):
            _check(where, k(name), getattr(self, name), int, 1)
        for name in ("resize_reducing_gap", "max_aspect", "crop_fraction"):
            _check(where, k(name), getattr(self, name), (int, float), 0)
        if not 0 < self.crop_fraction <= 1:
            _fail(where, k("crop_fraction"), f"must be in (0, 1], got {self.crop_fraction!r}")
        for name in ("resize_resample", "crop_resample"):
            if getattr(self, name) not in transforms.RESAMPLE:
                _fail(where, k(name), f"must be one of {sorted(transforms.RESAMPLE)}, got "
                      f"{getattr(self, name)!r}")
        if not isinstance(self.exif_transpose, bool):
            _fail(where, k("exif_transpose"), f"must be true or false, got "
                  f"{self.exif_transpose!r}")
        if self.stored_format not in IMAGE_FORMATS:
            _fail(where, k("stored_format"), f"must be one of {IMAGE_FORMATS}")
        if self.text_source not in TEXT_SOURCES:
            _fail(where, k("text_source"), f"must be one of {TEXT_SOURCES}")
        try:
            captions.apply_text_rule(self.text_rule, "Check_1")
        except (ValueError, TypeError, IndexError) as e:
            _fail(where, k("text_rule"), str(e))


# --- Architecture: the model's own dataclass fields as JSON ----------------------------------

def architecture_of(model) -> dict:
    """The constructor fields of a ``MultimodalClassifier`` as JSON; ``build_model`` inverts it.

    Tuples become lists, the compute dtype its name, the DistilBERT config its full dict.
    """
    out = {}
    for field in dataclasses.fields(model):
        if field.name in _NOT_ARCHITECTURE:
            continue
        value = getattr(model, field.name)
        if field.name == "text_config" and value is not None:
            import json

            value = json.loads(value.to_json_string(use_diff=False))
        elif field.name == "dtype":
            value = np.dtype(value).name
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def build_model(architecture: dict, num_classes: int, axis_name: str | None = None):
    """The flax model an ``architecture_of`` record describes.

    Args:
      architecture: the JSON record.
      num_classes: outputs.
      axis_name: the BatchNorm axis in training (None for inference).

    Raises:
      ValueError: a field the model does not have.
    """
    from jaxmm import models
    from jaxmm.models.fusion import MultimodalClassifier

    known = {f.name for f in dataclasses.fields(MultimodalClassifier)} - set(_NOT_ARCHITECTURE)
    unknown = sorted(set(architecture) - known)
    if unknown:
        raise ValueError(f"architecture.{unknown[0]} is not a field of this jaxmm's model")
    fields = dict(architecture)
    if fields.get("text_config") is not None:
        from transformers import DistilBertConfig

        fields["text_config"] = DistilBertConfig.from_dict(fields["text_config"])
    for name, value in fields.items():
        if isinstance(value, list):
            fields[name] = tuple(value)
    if "dtype" in fields:
        fields["dtype"] = models.compute_dtype(fields["dtype"])
    return MultimodalClassifier(num_classes=num_classes, axis_name=axis_name, **fields)


# --- The spec ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a trained model is: classes, architecture, preprocessing, calibration."""

    class_names: tuple
    architecture: dict
    preprocessing: Preprocessing
    temperature: float | None = None

    @property
    def modalities(self) -> tuple:
        return tuple(self.architecture["modalities"])

    def build_model(self, axis_name: str | None = None):
        """The flax model (BatchNorm synchronised over ``axis_name`` when training)."""
        return build_model(self.architecture, len(self.class_names), axis_name)

    def abstract_variables(self, model=None) -> dict:
        """Shapes and dtypes of the model's variables, computed without initialising them."""
        import jax

        from jaxmm import models

        model = model or self.build_model()
        pre = self.preprocessing
        return jax.eval_shape(lambda r: models.init_variables(
            model, r, pre.crop_size, pre.max_text_length), jax.random.PRNGKey(0))

    def with_temperature(self, temperature: float | None) -> "ModelSpec":
        return dataclasses.replace(self, temperature=temperature)

    def to_json(self) -> dict:
        calibration = None if self.temperature is None else {
            "temperature": float(self.temperature),
            "applied": "probabilities = softmax(logits / temperature)"}
        return {"spec_version": SPEC_VERSION, "class_names": list(self.class_names),
                "architecture": self.architecture, "preprocessing": self.preprocessing.to_json(),
                "calibration": calibration}

    @classmethod
    def from_json(cls, obj, where: str) -> "ModelSpec":
        """Reads ``to_json``'s form, checking every field.

        Raises:
          ValueError: "<where>: <key> ..." for the first bad field.
        """
        if not isinstance(obj, dict):
            _fail(where, "the model description", f"must be an object, got {type(obj).__name__}")
        for key in ("class_names", "architecture", "preprocessing"):
            if key not in obj:
                _fail(where, key, "is missing")
        names = obj["class_names"]
        if (not isinstance(names, list) or len(names) < 2
                or not all(isinstance(n, str) and n for n in names)
                or len(set(names)) != len(names)):
            _fail(where, "class_names", f"must be a list of 2 or more distinct names, got "
                  f"{names!r}")
        arch = obj["architecture"]
        if not isinstance(arch, dict) or not isinstance(arch.get("modalities"), list):
            _fail(where, "architecture", "must be an object with a modalities list")
        return cls(tuple(names), arch, Preprocessing.from_json(obj["preprocessing"], where),
                   temperature_of(obj.get("calibration"), where))


def temperature_of(calibration, where: str) -> float | None:
    """The temperature of a ``calibration`` entry (None or {"temperature": T, ...}).

    Raises:
      ValueError: T is not a number in ``TEMPERATURE_RANGE`` (a negative T inverts the
        predictions, 0 or NaN gives NaN, a huge T gives uniform probabilities).
    """
    if calibration is None:
        return None
    value = calibration.get("temperature") if isinstance(calibration, dict) else calibration
    low, high = TEMPERATURE_RANGE
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not np.isfinite(value) or not low <= value <= high):
        _fail(where, "calibration.temperature", f"must be a finite positive number in "
              f"[{low}, {high}], got {value!r}")
    return float(value)


# --- The model with its weights --------------------------------------------------------------

@dataclasses.dataclass
class TrainedModel:
    """A model ready for inference: its spec, the flax module, variables and tokenizer.

    Attributes:
      spec: what the model is.
      model: the flax module (built from ``spec``).
      variables: {"params", "batch_stats"} (host arrays).
      tokenizer: a transformers tokenizer (``__call__`` and ``save_pretrained``).
      step: the training step of the weights.
    """

    spec: ModelSpec
    model: Any
    variables: dict
    tokenizer: Any
    step: int

    @property
    def class_names(self) -> list:
        return list(self.spec.class_names)

    @property
    def modalities(self) -> tuple:
        return self.spec.modalities

    @property
    def preprocessing(self) -> Preprocessing:
        return self.spec.preprocessing

    def tokenize_batch(self) -> transforms.TokenizeBatch:
        """Replaces a batch's ``text`` by fixed-length ids and mask, as in training."""
        return transforms.TokenizeBatch(self.tokenizer, self.preprocessing.max_text_length)


def padded_batches(examples: list, batch_size: int, sizes=None):
    """Yields (chunk, padded chunk) of at most ``batch_size`` examples: each chunk is padded by
    repeating its first example to ``batch_size`` (or, with ``sizes``, to the smallest size in
    it that holds the chunk), so a compiled function sees a few shapes only.
    """
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        size = batch_size if sizes is None else min(s for s in sizes if s >= len(chunk))
        yield chunk, chunk + [chunk[0]] * (size - len(chunk))
