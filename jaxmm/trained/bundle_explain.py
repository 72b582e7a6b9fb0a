"""Explanation functions in an export bundle (``python -m jaxmm.export --explain``).

Optional bundle content, recorded in model.json under ``extensions.explain`` and digested like
every content file. Three more ``jax.export`` functions, in ``explain/``, take the weights file's
variables first, as ``predict.jaxexport`` does:

- ``towers.jaxexport``: (variables, image, input_ids, attention_mask) -> float32 logits
  ``[batch, tower sets, classes]``, one row per entry of ``tower_sets`` (both towers, then each
  alone, as ``jaxmm.evaluation.explain.modality_masks`` names them); the towers run once and
  only the fusion head runs per set. Symbolic batch size.
- ``grad_cam.jaxexport``: (variables, image, input_ids, attention_mask), batch 1 ->
  (Grad-CAM map ``[1, h, w]`` in [0, 1] of the predicted class, logits ``[1, classes]``).
- ``integrated_gradients.jaxexport``: (variables, image, input_ids, attention_mask, target),
  batch 1, target an int32 class -> (attributions ``[max_text_length]``, logit at the input,
  logit at the baseline); the baseline replaces every real token except ``keep_ids`` by the
  padding token (``explain.baseline_ids``), computed inside the function.

The functions are those of ``predict --explain`` (``jaxmm.evaluation.explain``), so a server
explains without flax. Writing imports flax; reading imports jax only.
"""

import os

import numpy as np

from jaxmm import paths
from jaxmm.errors import BundleError

FILES = {"towers": "towers.jaxexport", "grad_cam": "grad_cam.jaxexport",
         "integrated_gradients": "integrated_gradients.jaxexport"}


def _spec(shape, dtype):
    import jax

    return jax.ShapeDtypeStruct(shape, dtype)


def towers_function(model):
    """(variables, image, ids, mask) -> logits [B, tower sets, K]: the fusion head for every
    tower set of ``explain.modality_masks`` on the same tower features."""
    import flax.linen as nn
    import jax.numpy as jnp

    from jaxmm.evaluation.explain import modality_masks
    from jaxmm.models.fusion import FusionHead

    masks = np.stack(list(modality_masks(model.modalities).values()))

    def intercept(next_fun, args, kwargs, context):
        if not (isinstance(context.module, FusionHead) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        # One head call on the features repeated once per tower set (a compact module cannot
        # be called twice in one apply).
        feats, sets = args[0], len(masks)
        batch = feats[model.modalities[0]].shape[0]
        tiled = {m: jnp.tile(f, (sets, 1)) for m, f in feats.items()}
        keep = jnp.broadcast_to(jnp.asarray(masks)[:, None], (sets, batch, masks.shape[1]))
        keep = keep.reshape(sets * batch, masks.shape[1])
        logits = next_fun(tiled, keep, **kwargs)
        return jnp.swapaxes(logits.reshape(sets, batch, -1), 0, 1)

    def towers(variables, image, input_ids, attention_mask):
        with nn.intercept_methods(intercept):
            return model.apply(variables, image, input_ids, attention_mask, train=False)

    return towers


def ig_function(model, pad_id: int, keep_ids, steps: int):
    """(variables, image, ids, mask, target) -> integrated gradients of one example."""
    import jax.numpy as jnp

    from jaxmm.evaluation import explain

    keep_ids = jnp.asarray(list(keep_ids), jnp.int32)

    def attributions(variables, image, input_ids, attention_mask, target):
        keep = jnp.isin(input_ids, keep_ids) | (attention_mask == 0)
        baseline = jnp.where(keep, input_ids, pad_id).astype(input_ids.dtype)
        return explain.integrated_gradients(model, variables, image, input_ids, attention_mask,
                                            baseline, target, steps)

    return attributions


def export_functions(trained, variables: dict, platforms) -> tuple[dict, dict]:
    """Serializes the explanation functions of a trained model.

    Args:
      trained: a ``TrainedModel`` (built without a pmap axis).
      variables: {"params", "batch_stats"}, as the bundle's weights file holds them.
      platforms: platforms the functions are lowered for.

    Returns:
      ({file name in explain/: serialized bytes}, the ``extensions.explain`` entry).
    """
    import functools

    import jax
    import jax.numpy as jnp
    from jax import export

    from jaxmm.evaluation import explain

    model, pre, tok = trained.model, trained.preprocessing, trained.tokenizer
    length, crop = pre.max_text_length, pre.crop_size
    abstract = jax.tree.map(lambda x: _spec(np.shape(x), x.dtype), variables)

    def inputs(batch):
        return (_spec((batch, crop, crop, 3), jnp.uint8), _spec((batch, length), jnp.int32),
                _spec((batch, length), jnp.int32))

    def serialize(fn, *args):
        return bytes(export.export(jax.jit(fn), platforms=tuple(platforms))(
            abstract, *args).serialize())

    (b,) = export.symbolic_shape("b")
    out = {FILES["towers"]: serialize(towers_function(model), *inputs(b))}
    entry = {"folder": paths.BUNDLE_EXPLAIN_DIR, "platforms": list(platforms),
             "tower_sets": list(explain.modality_masks(model.modalities)),
             "towers": {"file": FILES["towers"], "batch": "symbolic",
                        "output": "logits [batch, len(tower_sets), classes]"}}
    if "image" in model.modalities:
        out[FILES["grad_cam"]] = serialize(functools.partial(explain.grad_cam, model),
                                           *inputs(1))
        entry["grad_cam"] = {"file": FILES["grad_cam"], "batch": 1,
                             "output": "(map [1, h, w] in [0, 1], logits [1, classes])"}
    if "text" in model.modalities:
        keep = [int(tok.cls_token_id), int(tok.sep_token_id)]
        fn = ig_function(model, int(tok.pad_token_id), keep, explain.IG_STEPS)
        out[FILES["integrated_gradients"]] = serialize(fn, *inputs(1), _spec((), jnp.int32))
        entry["integrated_gradients"] = {
            "file": FILES["integrated_gradients"], "batch": 1, "steps": explain.IG_STEPS,
            "keep_ids": keep, "pad_id": int(tok.pad_token_id),
            "output": "(attributions [max_text_length], logit at input, logit at baseline)"}
    return out, entry


def write(folder: str, trained, variables: dict, platforms) -> dict:
    """Writes the functions into ``folder``/explain/; returns the ``extensions.explain`` entry."""
    blobs, entry = export_functions(trained, variables, platforms)
    os.makedirs(os.path.join(folder, paths.BUNDLE_EXPLAIN_DIR))
    for name, blob in blobs.items():
        with open(os.path.join(folder, paths.BUNDLE_EXPLAIN_DIR, name), "wb") as f:
            f.write(blob)
    return entry


# --- Reading (jax only) ------------------------------------------------------------------------

def entry_of(record: dict) -> dict | None:
    """The ``extensions.explain`` entry of a bundle's record, or None (exported without)."""
    entry = (record.get("extensions") or {}).get("explain")
    return entry if isinstance(entry, dict) else None


def load(bundle_dir: str, record: dict) -> dict:
    """{"towers", "grad_cam", "integrated_gradients"}: the jitted functions the bundle has.

    Raises:
      BundleError: the bundle has no explanation functions (the message says how to export
        them), or a file is not a serialized function.
    """
    import jax
    from jax import export

    from jaxmm.trained.bundle import bundle_file

    entry = entry_of(record)
    if entry is None:
        raise BundleError(f"{bundle_dir}: exported without explanation functions; export it "
                          "again with `python -m jaxmm.export --explain`")
    out = {}
    for key in FILES:
        if key not in entry:
            continue
        path = bundle_file(bundle_dir, f"{paths.BUNDLE_EXPLAIN_DIR}/{entry[key]['file']}")
        try:
            with open(path, "rb") as f:
                out[key] = jax.jit(export.deserialize(bytearray(f.read())).call)
        except Exception as e:  # noqa: BLE001 -- a corrupt or foreign file
            raise BundleError(f"{path}: not a serialized jax.export function "
                              f"({str(e).splitlines()[0][:200] if str(e) else e!r})") from None
    return out
