"""The export bundle: a trained model in one folder, runnable without jaxmm (format 2).

A bundle (``python -m jaxmm.export``) holds, under the names in ``jaxmm.paths``:

- ``model.json``: the model's ``ModelSpec`` (``"model"``), the exported function's inputs and
  outputs, every weight's shape and dtype, the tokenizer's settings, a SHA-256 of every content
  file, the model id, versions and provenance (docs/bundle.md describes every field;
  ``examples/predict_standalone.py`` is a client built from it alone).
- ``weights.safetensors`` (no pickle), ``tokenizer/``, and ``predict.jaxexport``: a serialized
  ``jax.export`` function (StableHLO for CPU and CUDA, symbolic batch size) from (variables,
  uint8 images, token ids, mask) to logits; ``MODEL_CARD.md`` for people (not digested);
  optionally ``explain/``, the explanation functions (``bundle_explain``, export --explain).

Files a user adds are not digested and survive a re-export. Reading checks every field and
every digest and fails with one line naming the file and key.
Importing this module is cheap (no jax, flax or transformers); writing imports them.
"""

import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Mapping

import numpy as np

from jaxmm import files, paths, versions
from jaxmm.errors import BundleError, ConfigError
from jaxmm.trained.model import ModelSpec, Preprocessing, TrainedModel

FORMAT = "jaxmm-bundle"
FORMAT_VERSION = 2
PLATFORMS = ("cpu", "cuda")
ARGUMENTS = ("variables", "image", "input_ids", "attention_mask")
# The files of a bundle that jaxmm writes; a re-export replaces these and nothing else.
OWN_FILES = (paths.BUNDLE_SPEC_FILE, paths.BUNDLE_WEIGHTS_FILE, paths.BUNDLE_FUNCTION_FILE,
             paths.TOKENIZER_DIR, paths.MODEL_CARD_FILE, paths.BUNDLE_EXPLAIN_DIR)


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


# --- Digests -------------------------------------------------------------------------------------

def file_digest(path: str) -> str:
    """"sha256:<hex>" of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def json_digest(obj) -> str:
    """"sha256:<hex>" of the canonical JSON of ``obj`` (sorted keys, no spaces, UTF-8)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def content_files(bundle_dir: str) -> list[str]:
    """The digested files of a bundle, relative and sorted (weights, function, tokenizer and
    the explanation functions when there are any)."""
    out = [paths.BUNDLE_WEIGHTS_FILE, paths.BUNDLE_FUNCTION_FILE]
    for folder in (paths.TOKENIZER_DIR, paths.BUNDLE_EXPLAIN_DIR):
        for root, _, names in os.walk(os.path.join(bundle_dir, folder)):
            out += [os.path.relpath(os.path.join(root, n), bundle_dir).replace(os.sep, "/")
                    for n in names]
    return sorted(out)


def model_id(digests: Mapping) -> str:
    """The model's id: a digest of every content digest (weights, function, tokenizer, spec)."""
    return "jaxmm-" + json_digest(dict(digests)).split(":")[1][:16]


def verify_digests(bundle_dir: str, record: dict) -> None:
    """Recomputes every digest of model.json.

    Raises:
      BundleError: a file changed, is missing, or a file of the bundle is not recorded.
    """
    recorded = record["digests"]
    where = os.path.join(bundle_dir, paths.BUNDLE_SPEC_FILE)
    found = content_files(bundle_dir)
    for name in sorted(set(found) - set(recorded) - {"model"}):
        raise BundleError(f"{os.path.join(bundle_dir, name)}: not one of the files {where} "
                          "records; the bundle was changed after export")
    for name, digest in sorted(recorded.items()):
        path = os.path.join(bundle_dir, name)
        actual = (json_digest(record["model"]) if name == "model"
                  else file_digest(bundle_file(bundle_dir, name)))
        if actual != digest:
            what = f"{where}: its \"model\" entry" if name == "model" else path
            raise BundleError(f"{what} changed after export (its SHA-256 is not the one "
                              f"recorded in {paths.BUNDLE_SPEC_FILE}); export the bundle again")


# --- Reading -------------------------------------------------------------------------------------

def read_record(bundle_dir: str, verify: bool = True) -> dict:
    """The bundle's ``model.json`` in the current format, every field checked.

    Args:
      bundle_dir: the bundle folder.
      verify: recompute the content digests (a format-1 bundle has none).

    Raises:
      BundleError: one line naming the file and the key.
    """
    if not os.path.isdir(bundle_dir):
        raise BundleError(f"{bundle_dir}: no such bundle folder")
    path = bundle_file(bundle_dir, paths.BUNDLE_SPEC_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: not readable as JSON ({_reason(e)})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise BundleError(f'{path}: not a jaxmm bundle description (no "format": "{FORMAT}")')
    version = record.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BundleError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {version} is newer than this jaxmm "
                          f"reads ({FORMAT_VERSION}); upgrade jaxmm")
    if version == 1:
        from jaxmm.trained import legacy

        record = legacy.upgrade_bundle(record, path, FORMAT_VERSION, PLATFORMS)
    try:
        check_record(record, path)
        ModelSpec.from_json(record["model"], path)
    except ValueError as e:
        raise BundleError(str(e)) from None
    if verify and record.get("digests") is not None:
        verify_digests(bundle_dir, record)
    return record


def _need(record: dict, key: str, kind, path: str):
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"{path}: {key} is missing")
        value = value[part]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{path}: {key} must be {kind.__name__}, got {value!r}")
    return value


def check_record(record: dict, path: str) -> None:
    """Checks the fields of model.json besides the spec (ValueError naming the key)."""
    for key in ("model", "weights", "function", "tokenizer"):
        _need(record, key, dict, path)
    tensors = _need(record, "weights.tensors", dict, path)
    for name, t in tensors.items():
        if (not isinstance(t, dict) or not isinstance(t.get("shape"), list)
                or not all(isinstance(d, int) and d >= 0 for d in t["shape"])
                or t.get("dtype") not in ("float32", "float16", "bfloat16", "int32")):
            raise ValueError(f"{path}: weights.tensors.{name} needs a shape (whole numbers) "
                             f"and a dtype, got {t!r}")
    _need(record, "function.file", str, path)
    _need(record, "tokenizer.pad_id", int, path)
    _need(record, "tokenizer.pad_token", str, path)
    if record.get("digests") is not None:
        _need(record, "digests", dict, path)


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


def check_tensors(got: Mapping, want: Mapping, path: str, against: str) -> None:
    """Fails with one line when two {name: {"shape", "dtype"}} tables differ."""
    norm = lambda t: (tuple(t["shape"]), t["dtype"])  # noqa: E731
    got = {k: norm(v) for k, v in got.items()}
    want = {k: norm(v) for k, v in want.items()}
    if got == want:
        return
    wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if wrong:
        detail = (f"tensor {wrong[0]} is {got[wrong[0]][1]} {list(got[wrong[0]][0])}, "
                  f"{against} needs {want[wrong[0]][1]} {list(want[wrong[0]][0])}")
    elif missing:
        detail = f"{len(missing)} tensors are missing, e.g. {missing[0]}"
    else:
        detail = f"{len(extra)} tensors are not in {against}, e.g. {extra[0]}"
    raise BundleError(f"{path}: does not fit {against}: {detail}")


def tensor_table(flat: Mapping) -> dict:
    """{name: {"shape", "dtype"}} of flat arrays."""
    return {k: {"shape": list(np.shape(v)), "dtype": np.dtype(v.dtype).name}
            for k, v in flat.items()}


def read_weights(bundle_dir: str, record: dict) -> dict:
    """The model variables of a bundle as NumPy arrays, checked against model.json."""
    from safetensors.numpy import load_file

    path = bundle_file(bundle_dir, paths.BUNDLE_WEIGHTS_FILE)
    try:
        flat = load_file(path)
    except Exception as e:  # noqa: BLE001 -- any parse failure means "not a weights file"
        raise BundleError(f"{path}: not a readable safetensors file ({_reason(e)})") from None
    check_tensors(tensor_table(flat), record["weights"]["tensors"], path,
                  paths.BUNDLE_SPEC_FILE)
    return unflatten(flat)


def spec_of(record: dict) -> ModelSpec:
    return ModelSpec.from_json(record["model"], paths.BUNDLE_SPEC_FILE)


# --- Writing -------------------------------------------------------------------------------------

def export_function(model, variables: dict, pre: Preprocessing, platforms=PLATFORMS) -> bytes:
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
    length = pre.max_text_length
    exported = export.export(jax.jit(logits), platforms=tuple(platforms))(
        jax.tree.map(lambda x: spec(np.shape(x), x.dtype), variables),
        spec((b, pre.crop_size, pre.crop_size, 3), jnp.uint8),
        spec((b, length), jnp.int32), spec((b, length), jnp.int32))
    return bytes(exported.serialize())


def _interface(spec: ModelSpec, platforms) -> dict:
    pre, k = spec.preprocessing, len(spec.class_names)
    return {
        "inputs": {
            "image": {"dtype": "uint8", "shape": ["batch", pre.crop_size, pre.crop_size, 3],
                      "layout": "NHWC, RGB, 0..255; the function normalises it"},
            "input_ids": {"dtype": "int32", "shape": ["batch", pre.max_text_length]},
            "attention_mask": {"dtype": "int32", "shape": ["batch", pre.max_text_length]}},
        "outputs": {"logits": {"dtype": "float32", "shape": ["batch", k]}},
        "function": {"file": paths.BUNDLE_FUNCTION_FILE, "platforms": list(platforms),
                     "batch": "symbolic", "arguments": list(ARGUMENTS), "output": "logits",
                     "variables": "the weights file's tensors nested by their '/'-separated "
                                  "names: {'params': ..., 'batch_stats': ...}",
                     "load": "jax.export.deserialize (needs the flatbuffers package)"},
    }


def _tokenizer_entry(tokenizer, pre: Preprocessing) -> dict:
    return {"folder": paths.TOKENIZER_DIR, "file": f"{paths.TOKENIZER_DIR}/tokenizer.json",
            "library": "tokenizers", "truncate_to": pre.max_text_length,
            "pad_to": pre.max_text_length, "pad_token": tokenizer.pad_token,
            "pad_id": int(tokenizer.pad_token_id), "vocab_size": len(tokenizer)}


def _target_dir(out_dir: str) -> str:
    """A private folder next to ``out_dir``, which may only be absent, empty or a bundle."""
    if not out_dir or not str(out_dir).strip():
        raise ConfigError("--out is empty: give the bundle folder to write")
    if os.path.islink(out_dir) or (os.path.exists(out_dir) and not os.path.isdir(out_dir)):
        raise ConfigError(f"{out_dir}: exists and is not a folder; choose another --out")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not _is_bundle(out_dir):
        raise ConfigError(f"{out_dir}: exists, is not empty and is not a jaxmm bundle; choose "
                          "another --out")
    tmp = f"{os.path.abspath(out_dir).rstrip(os.sep)}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _is_bundle(folder: str) -> bool:
    record = files.read_json(os.path.join(folder, paths.BUNDLE_SPEC_FILE))
    return isinstance(record, dict) and record.get("format") == FORMAT


def _move_into(tmp: str, out_dir: str) -> None:
    """Replaces the bundle's own files in ``out_dir`` by those in ``tmp``; model.json goes
    first out and last in, so a reader never takes a half-replaced folder for a bundle."""
    if not os.path.isdir(out_dir):
        os.replace(tmp, out_dir)
        return
    for name in OWN_FILES + (paths.JAX_CACHE_DIR,):
        target = os.path.join(out_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        elif os.path.lexists(target):
            os.remove(target)
    for name in sorted(os.listdir(tmp), key=lambda n: n == paths.BUNDLE_SPEC_FILE):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def write_bundle(out_dir: str, trained: TrainedModel, source: dict,
                 platforms=PLATFORMS, workdir=None, explain: bool = False) -> dict:
    """Writes a bundle folder (into a private folder first, then moved into place).

    Args:
      out_dir: the bundle folder to create, or an existing bundle to replace.
      trained: the model (built without a pmap axis), its variables, tokenizer and spec.
      source: provenance (checkpoint, step, the run's config and data record).
      platforms: platforms the function is lowered for.
      workdir: the run's ``Workdir``, for the model card (none without it).
      explain: add the explanation functions (``bundle_explain``; Grad-CAM, integrated
        gradients, per-tower probabilities), recorded under ``extensions.explain``.

    Returns:
      The model.json record.
    """
    from safetensors.numpy import save_file

    spec, pre = trained.spec, trained.preprocessing
    tmp = _target_dir(out_dir)
    try:
        variables = {"params": trained.variables["params"],
                     "batch_stats": trained.variables.get("batch_stats") or {}}
        flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten(variables).items()}
        weights = os.path.join(tmp, paths.BUNDLE_WEIGHTS_FILE)
        save_file(flat, weights, metadata={"format": FORMAT})
        os.chmod(weights, 0o644)  # safetensors writes it private; a bundle is meant to be shared
        trained.tokenizer.save_pretrained(os.path.join(tmp, paths.TOKENIZER_DIR))
        with open(os.path.join(tmp, paths.BUNDLE_FUNCTION_FILE), "wb") as f:
            f.write(export_function(trained.model, variables, pre, platforms))
        extensions = {}
        if explain:
            from jaxmm.trained import bundle_explain

            extensions["explain"] = bundle_explain.write(tmp, trained, variables, platforms)
        model = spec.to_json()
        digests = {name: file_digest(os.path.join(tmp, name)) for name in content_files(tmp)}
        digests["model"] = json_digest(model)
        record = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.UTC).isoformat(
                timespec="seconds"),
            "model_id": model_id(digests), "model": model, **_interface(spec, platforms),
            "weights": {"file": paths.BUNDLE_WEIGHTS_FILE, "count": len(flat),
                        "values": int(sum(v.size for v in flat.values())),
                        "tensors": tensor_table(flat)},
            "tokenizer": _tokenizer_entry(trained.tokenizer, pre), "digests": digests,
            "versions": versions.package_versions(versions.BUNDLE), "source": source,
            "extensions": extensions,
        }
        files.write_json(os.path.join(tmp, paths.BUNDLE_SPEC_FILE), record)
        if workdir is not None:
            from jaxmm.trained import model_card

            model_card.write_card(tmp, record, workdir)
        _move_into(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def export_run(workdir: str, out_dir: str, checkpoint: str = "best", platforms=PLATFORMS,
               calibrated: bool = True, explain: bool = False) -> dict:
    """Exports a checkpoint of a trained run as a bundle (see ``write_bundle``; ``explain``
    adds the explanation functions).

    Needs only the workdir (its record, tokenizer copy, calibration and checkpoint).

    Returns:
      The model.json record.
    """
    from jaxmm.trained.workdir import Workdir

    wd = Workdir(workdir)
    trained = wd.load_model(checkpoint, calibrated=calibrated)
    record = wd.read_record()
    source = {"checkpoint": str(checkpoint), "step": int(trained.step),
              "config": record["config"], "data": record.get("data")}
    return write_bundle(out_dir, trained, source, platforms, workdir=wd, explain=explain)
