"""Writing an export bundle from a trained run: the library half of ``python -m jaxmm.export``.

The bundle's layout and its reader are in ``jaxmm.bundle``. Weights go to safetensors (no pickle
anywhere in a bundle), the inference function to a serialized ``jax.export`` module lowered for
every platform in ``PLATFORMS`` at once (lowering needs no device of that kind), with a symbolic
batch size so one file serves any batch.
"""

import datetime
import importlib.metadata
import os
import shutil

import numpy as np

from jaxmm import bundle, files, paths
from jaxmm.data import transforms
from jaxmm.errors import ConfigError, WorkdirError

PLATFORMS = ("cpu", "cuda")
PACKAGES = ("jax", "jaxlib", "flax", "numpy", "pillow", "safetensors", "tokenizers",
            "transformers")
_ARCH_FIELDS = ("image_arch", "text_pooling", "fusion", "proj_dim", "hidden_dim", "dropout",
                "modality_dropout", "freeze_image")


def package_versions() -> dict:
    """Versions of jaxmm and of the packages a bundle is written and run with."""
    from jaxmm import __version__

    out = {"jaxmm": __version__}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def architecture_of(model) -> dict:
    """The constructor arguments of a ``MultimodalClassifier`` as JSON (``bundle.build_model``
    turns them back into the model); the text tower's DistilBERT config is kept whole."""
    import json

    import jax.numpy as jnp

    arch = {f: getattr(model, f) for f in _ARCH_FIELDS}
    arch["modalities"] = list(model.modalities)
    arch["dtype"] = jnp.dtype(model.dtype).name
    arch["text_config"] = (json.loads(model.text_config.to_json_string(use_diff=False))
                           if model.text_config is not None else None)
    return arch


def preprocessing_of(config, recorded: dict, stored: dict, tokenizer) -> dict:
    """How raw inputs become model inputs, as evaluation does it.

    Args:
      config: the run's config.
      recorded: the run record's preprocessing (image_size, max_text_length, text_source).
      stored: how prepare stored the records: size, fmt, quality, max_pixels.
      tokenizer: the run's transformers tokenizer (for its padding token).
    """
    from jaxmm.models import resnet

    return {
        "resize": "shorter side to stored_size (longer side cut to 2x), re-encoded as stored",
        "stored_size": int(stored["size"]), "stored_format": stored["fmt"],
        "jpeg_quality": int(stored["quality"]), "max_pixels": int(stored["max_pixels"]),
        "crop": "centre", "crop_fraction": transforms.EVAL_CROP_FRACTION,
        "crop_size": int(recorded.get("image_size", config.image_size)),
        "normalisation": {"input": "uint8 RGB; x / 255, then (x - mean) / std, in the function",
                          "mean": list(resnet.IMAGENET_MEAN), "std": list(resnet.IMAGENET_STD)},
        "text": {"rule": "file name: lower-case, '_' to space, letters only",
                 "trained_on": recorded.get("text_source", config.text_source),
                 "max_text_length": int(recorded.get("max_text_length", config.max_text_length)),
                 "pad_token": tokenizer.pad_token, "pad_id": int(tokenizer.pad_token_id)},
    }


def calibration_of(workdir: str) -> dict | None:
    """The run's fitted temperature (``calibration.json``), or None when it has none.

    Raises:
      WorkdirError: the file exists but holds no positive temperature.
    """
    path = paths.in_workdir(workdir, paths.CALIBRATION_FILE)
    if not os.path.exists(path):
        return None
    record = files.read_json(path)
    temperature = record.get("temperature") if isinstance(record, dict) else None
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise WorkdirError(f"{path}: no positive 'temperature' in it")
    return {"temperature": float(temperature), "from": paths.CALIBRATION_FILE}


def export_function(model, variables: dict, crop_size: int, max_text_length: int,
                    platforms=PLATFORMS) -> bytes:
    """Serializes (variables, uint8 images, ids, mask) -> float32 logits with jax.export.

    The batch size is symbolic; the weights are arguments (they live in the safetensors file,
    not twice in the bundle).
    """
    import jax
    import jax.numpy as jnp
    from jax import export

    def logits(variables, image, input_ids, attention_mask):
        return model.apply(variables, image, input_ids, attention_mask, train=False)

    (b,) = export.symbolic_shape("b")
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    exported = export.export(jax.jit(logits), platforms=tuple(platforms))(
        jax.tree.map(lambda x: spec(np.shape(x), x.dtype), variables),
        spec((b, crop_size, crop_size, 3), jnp.uint8),
        spec((b, max_text_length), jnp.int32), spec((b, max_text_length), jnp.int32))
    return bytes(exported.serialize())


def _fresh_dir(out_dir: str) -> str:
    """A private folder next to ``out_dir``; ``out_dir`` may only be absent, empty or a bundle."""
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(
            os.path.join(out_dir, paths.BUNDLE_SPEC_FILE)):
        raise ConfigError(f"{out_dir}: exists, is not empty and is not a bundle; choose another "
                         "--out")
    tmp = f"{os.path.abspath(out_dir).rstrip(os.sep)}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def write_bundle(out_dir: str, *, model, variables: dict, class_names: list, tokenizer,
                 preprocessing: dict, calibration: dict | None, source: dict,
                 platforms=PLATFORMS) -> dict:
    """Writes a bundle folder (into a private folder first, then renamed into place).

    Args:
      out_dir: the bundle folder to create or replace.
      model: the flax model, built without a pmap axis.
      variables: {"params", "batch_stats"} of the model.
      class_names: output classes in logit order.
      tokenizer: the run's transformers tokenizer (saved with ``save_pretrained``).
      preprocessing: from ``preprocessing_of``.
      calibration: from ``calibration_of``.
      source: provenance (checkpoint, step, the run's config).
      platforms: platforms the function is lowered for.

    Returns:
      The model.json record.
    """
    from safetensors.numpy import save_file

    tmp = _fresh_dir(out_dir)
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats") or {}}
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in bundle.flatten(variables).items()}
    weights = os.path.join(tmp, paths.BUNDLE_WEIGHTS_FILE)
    save_file(flat, weights, metadata={"format": bundle.FORMAT})
    os.chmod(weights, 0o644)  # safetensors writes it private; the bundle is meant to be shared
    tokenizer.save_pretrained(os.path.join(tmp, paths.TOKENIZER_DIR))
    crop, length = preprocessing["crop_size"], preprocessing["text"]["max_text_length"]
    with open(os.path.join(tmp, paths.BUNDLE_FUNCTION_FILE), "wb") as f:
        f.write(export_function(model, variables, crop, length, platforms))
    spec = {
        "format": bundle.FORMAT, "format_version": bundle.FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "class_names": list(class_names), "architecture": architecture_of(model),
        "preprocessing": preprocessing, "calibration": calibration,
        "weights": {"file": paths.BUNDLE_WEIGHTS_FILE, "count": len(flat),
                    "values": int(sum(v.size for v in flat.values())),
                    "shapes": {k: list(v.shape) for k, v in flat.items()}},
        "function": {"file": paths.BUNDLE_FUNCTION_FILE, "platforms": list(platforms),
                     "batch": "symbolic", "inputs": ["variables", "image", "input_ids",
                                                     "attention_mask"], "output": "logits"},
        "versions": package_versions(), "source": source,
    }
    files.write_json(os.path.join(tmp, paths.BUNDLE_SPEC_FILE), spec)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return spec


def export_run(workdir: str, out_dir: str, checkpoint: str = "best",
               platforms=PLATFORMS) -> dict:
    """Exports a checkpoint of a trained run as a bundle (see ``write_bundle``).

    Needs only the workdir (its record, tokenizer copy and checkpoint), not the dataset.

    Returns:
      The model.json record.
    """
    from jaxmm import restore
    from jaxmm.data import builder

    run = restore.load_run(workdir, checkpoint)
    pre, defaults = run.preprocessing, builder.EncodeOptions()
    stored = {"size": pre["stored_image_size"], "fmt": pre["image_format"],
              "quality": pre.get("jpeg_quality", defaults.quality),
              "max_pixels": pre.get("max_pixels", defaults.max_pixels)}
    source = {"checkpoint": str(checkpoint), "step": int(run.step),
              "config": run.config.to_dict()}
    return write_bundle(out_dir, model=run.model, variables=run.variables,
                        class_names=run.class_names, tokenizer=run.tokenizer,
                        preprocessing=preprocessing_of(run.config, pre, stored, run.tokenizer),
                        calibration=calibration_of(workdir), source=source,
                        platforms=platforms)
