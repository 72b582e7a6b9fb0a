"""Reading what older jaxmm versions wrote, in one place: run records and export bundles of
format 1. Each is converted in memory to the current format (the files are left as they are);
every other module reads the current format only.

- A format-1 run record (``config.json`` without ``record_version``) recorded the preprocessing
  as a flat dict and no model description: the architecture is rebuilt from the config, as that
  version did. Runs older still (no preprocessing record, no tokenizer copy) are refused.
- A format-1 bundle (``model.json`` with ``format_version`` 1) has no content digests, so it
  loads unverified (with a warning); re-exporting it from its run gives a verified bundle.
"""

import logging
import os

from jaxmm import paths
from jaxmm.errors import BundleError, WorkdirError
from jaxmm.trained.model import ModelSpec, Preprocessing, temperature_of

log = logging.getLogger("jaxmm")


def upgrade_run_record(record: dict, workdir) -> dict:
    """A format-1 run record in the current format.

    Raises:
      WorkdirError: a record older than format 1.
    """
    from jaxmm import models
    from jaxmm.trained.workdir import RECORD_VERSION, config_of, model_architecture

    path = workdir.file(paths.CONFIG_FILE)
    if "preprocessing" not in record or not os.path.isdir(workdir.file(paths.TOKENIZER_DIR)):
        raise WorkdirError(f"{path}: written by a jaxmm older than its preprocessing record and "
                           "tokenizer copy; this version cannot rebuild the model: train again")
    old = record["preprocessing"]
    try:
        pre = Preprocessing(
            stored_size=int(old["stored_image_size"]), crop_size=int(old["image_size"]),
            max_text_length=int(old["max_text_length"]), text_source=old["text_source"],
            stored_format=old.get("image_format", "jpeg"),
            jpeg_quality=int(old.get("jpeg_quality", Preprocessing.jpeg_quality)),
            max_pixels=int(old.get("max_pixels", Preprocessing.max_pixels)))
        pre.check(path)
    except (KeyError, TypeError, ValueError) as e:
        raise WorkdirError(f"{path}: unreadable preprocessing record ({e})") from None
    config = config_of(record)
    vocab = len(workdir.tokenizer())
    model = models.build_model(config.model, len(record["class_names"]), vocab, axis_name=None)
    spec = ModelSpec(tuple(record["class_names"]), model_architecture(model, config), pre)
    return {**record, "record_version": RECORD_VERSION, "model": spec.to_json()}


def upgrade_bundle(record: dict, path: str, format_version: int, platforms) -> dict:
    """A format-1 ``model.json`` in the current format (no digests: it loads unverified).

    Raises:
      BundleError: a field format 1 always had is missing or malformed.
    """
    try:
        old, text = record["preprocessing"], record["preprocessing"]["text"]
        pre = Preprocessing(
            stored_size=int(old["stored_size"]), crop_size=int(old["crop_size"]),
            max_text_length=int(text["max_text_length"]), text_source=text["trained_on"],
            stored_format=old["stored_format"], jpeg_quality=int(old["jpeg_quality"]),
            max_pixels=int(old["max_pixels"]), crop_fraction=float(old["crop_fraction"]))
        temperature = temperature_of(record.get("calibration"), path)
        spec = ModelSpec(tuple(record["class_names"]), record["architecture"], pre, temperature)
        tensors = {k: {"shape": list(v), "dtype": "float32"}
                   for k, v in record["weights"]["shapes"].items()}
        tokenizer = {"pad_token": text["pad_token"], "pad_id": int(text["pad_id"])}
        function = {**record["function"], "platforms": record["function"].get(
            "platforms", list(platforms))}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"{path}: a format-1 bundle with a missing or malformed field "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    log.warning("%s: bundle format 1 records no content digests, so its files are not "
                "verified; export the run again for a verified bundle", path)
    return {"format": record["format"], "format_version": format_version,
            "created": record.get("created"), "model_id": None, "model": spec.to_json(),
            "weights": {**record["weights"], "tensors": tensors}, "function": function,
            "tokenizer": tokenizer, "digests": None, "versions": record.get("versions", {}),
            "source": record.get("source", {}), "extensions": {}}
