"""Grafting pretrained tower weights into freshly initialised variables.

Sources (config.model.image_pretrained / text_pretrained) are local paths or hub ids that
resolve from the local Hugging Face cache; nothing is ever downloaded here (see
``python -m jaxmm.download_weights``). Every pretrained tensor must be used and match its
parameter's shape, and every tower parameter must be covered; only the checkpoint's task head
(ImageNet classifier, masked-LM head ...) is discarded, and that is logged. Only safetensors and
Flax msgpack weights are read: a pickle-based checkpoint (``.bin``, ``.pt``, ``.pth``, ``.ckpt``,
...) can run code when it is loaded, so such a path is refused before it is opened.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import numpy as np
from flax import serialization, traverse_util
from safetensors.numpy import load_file

from jaxmm.errors import PretrainedFormatError, PretrainedNotFoundError
from jaxmm.models import resnet

FLAX_WEIGHTS = "flax_model.msgpack"
SAFE_WEIGHTS = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".msgpack")  # the only weight files ever opened
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".joblib")
TEXT_TASK_HEADS = ("vocab_transform", "vocab_layer_norm", "vocab_projector", "pre_classifier",
                   "classifier", "qa_outputs")
DOWNLOAD_HINT = (
    "On a machine with internet access run\n"
    "    python -m jaxmm.download_weights --out DIR\n"
    "copy DIR here and set config.model.image_pretrained=DIR/resnet50, "
    "config.model.text_pretrained=DIR/distilbert and config.tokenizer=DIR/distilbert."
)


def check_weights_path(source: str, tower: str) -> None:
    """Refuses a weights file that is not safetensors or msgpack, without opening it.

    Raises:
      PretrainedFormatError: naming the path and what to use instead.
    """
    suffix = os.path.splitext(source.rstrip("/"))[1].lower()
    pickled = suffix in PICKLE_SUFFIXES
    if pickled or (os.path.isfile(source) and suffix not in WEIGHT_SUFFIXES):
        what = ("a pickle-based checkpoint, which can run code when loaded" if pickled
                else "not a .safetensors or .msgpack file")
        raise PretrainedFormatError(
            f"{tower} weights {source!r}: {what}; it is refused. Use a folder with "
            f"{SAFE_WEIGHTS} or {FLAX_WEIGHTS}, or a .safetensors file (re-save the model "
            "with save_pretrained(..., safe_serialization=True) on a trusted machine)")


def resolve_pretrained(source: str, tower: str) -> str:
    """Returns a local file or directory for ``source`` (a path, or a hub id in the cache).

    Raises:
      PretrainedFormatError: a pickle or other non-safetensors/msgpack weights file.
      PretrainedNotFoundError: with instructions for pre-downloading the weights.
    """
    check_weights_path(source, tower)
    if os.path.exists(source):
        return source
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=source, local_files_only=True)
    except Exception:  # noqa: BLE001 - every failure here means "not available offline"
        raise PretrainedNotFoundError(
            f"{tower} weights {source!r}: no such local path and no cached copy of that hub id "
            f"(nothing is downloaded during training).\n{DOWNLOAD_HINT}"
        ) from None


def _weights_file(path: str) -> str:
    if os.path.isfile(path):
        check_weights_path(path, "the")
        return path
    for name in (FLAX_WEIGHTS, SAFE_WEIGHTS):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise PretrainedFormatError(
        f"{path!r} holds neither {FLAX_WEIGHTS} nor {SAFE_WEIGHTS} (sharded and "
        "pytorch_model.bin checkpoints are not supported: re-save as safetensors)")


def read_image_state(source: str) -> dict[str, np.ndarray]:
    """Reads ResNet weights as a torchvision-named, PyTorch-layout flat dict.

    Accepts an HF-format directory (``flax_model.msgpack`` or PyTorch ``model.safetensors``),
    or a torchvision/timm-format safetensors file or directory; the layout is detected from the
    key names.
    """
    path = resolve_pretrained(source, "image")
    weights = _weights_file(path)
    config_path = os.path.join(os.path.dirname(weights), "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            hf_config = json.load(f)
        if hf_config.get("model_type") == "resnet" and hf_config.get("downsample_in_bottleneck"):
            raise PretrainedFormatError(
                f"{source!r} is a ResNet v1 (stride in the first 1x1 convolution); "
                "the image tower is ResNet v1.5")
    if weights.endswith(".msgpack"):
        with open(weights, "rb") as f:
            state = resnet.hf_flax_to_torch_layout(serialization.msgpack_restore(f.read()))
    else:
        state = load_file(weights)
    if any(k.removeprefix("resnet.").startswith("embedder.") for k in state):
        return resnet.hf_to_torchvision(state)
    if "conv1.weight" in state:
        return state
    raise PretrainedFormatError(
        f"{weights!r} is neither an HF-format nor a torchvision-format ResNet "
        f"(first keys: {sorted(state)[:3]})")


def read_text_state(source: str) -> tuple[dict, list[str]]:
    """Reads DistilBERT weights into FlaxDistilBertModel's param tree.

    Uses transformers' own loaders (those behind ``FlaxDistilBertModel.from_pretrained``) but
    keeps the whole checkpoint, because from_pretrained silently drops unused tensors and
    random-initialises missing ones.

    Returns:
      (params tree {embeddings, transformer, ...}, names of discarded task-head tensors).
    """
    from transformers import DistilBertConfig, FlaxDistilBertModel
    from transformers.modeling_flax_pytorch_utils import (
        load_pytorch_checkpoint_in_flax_state_dict,
    )

    path = resolve_pretrained(source, "text")
    weights = _weights_file(path)
    if weights.endswith(".msgpack"):
        state = FlaxDistilBertModel.load_flax_weights(weights)
    else:  # PyTorch-format safetensors: the conversion needs a model for key names/shapes
        config = DistilBertConfig.from_pretrained(os.path.dirname(weights))
        state = load_pytorch_checkpoint_in_flax_state_dict(
            FlaxDistilBertModel(config, seed=0), weights, False)
    if "distilbert" in state:  # a model with a head: the base model sits under its prefix
        heads = {k: v for k, v in state.items() if k != "distilbert"}
        state = dict(state["distilbert"], **heads)
    discarded = [k for k in state if k in TEXT_TASK_HEADS]
    for key in discarded:
        state.pop(key)
    return state, discarded


def graft(target: dict, loaded: dict[tuple, tuple[str, np.ndarray]], where: str) -> dict:
    """Replaces every leaf of ``target`` by its pretrained value, strictly.

    Args:
      target: flat {path: array} of the tower's current variables.
      loaded: {path: (checkpoint key, array)}.
      where: tower name for messages.

    Returns:
      New flat dict with float32 pretrained values.

    Raises:
      PretrainedFormatError: naming the first unused tensor, shape mismatch, or the missing
        parameters.
    """
    out = dict(target)
    for path, (key, value) in loaded.items():
        if path not in target:
            raise PretrainedFormatError(
                f"{where}: pretrained tensor {key!r} matches no model parameter "
                f"(looked for {'/'.join(map(str, path))}); wrong architecture?")
        if tuple(value.shape) != tuple(target[path].shape):
            raise PretrainedFormatError(
                f"{where}: pretrained tensor {key!r} has shape {tuple(value.shape)}"
                f" but model parameter {'/'.join(path)} has "
                f"{tuple(target[path].shape)}")
        out[path] = np.asarray(value, np.float32)
    missing = sorted("/".join(p) for p in set(target) - set(loaded))
    if missing:
        raise PretrainedFormatError(
            f"{where}: {len(missing)} tower parameters are not in the checkpoint, "
            f"e.g. {missing[:3]}")
    return out


def _load_image(variables: dict, source: str, log: Callable) -> None:
    mapped, discarded = resnet.torchvision_to_linen(read_image_state(source))
    target = {(collection, *p): v
              for collection in ("params", "batch_stats")
              for p, v in traverse_util.flatten_dict(variables[collection]["image"]).items()}
    new = graft(target, mapped, "image tower")
    for collection in ("params", "batch_stats"):
        variables[collection]["image"] = traverse_util.unflatten_dict(
            {p[1:]: jax.numpy.asarray(v) for p, v in new.items() if p[0] == collection})
    log(f"image tower: loaded {len(mapped)} tensors from {source!r}; "
        f"discarded {len(discarded)} (ImageNet head, counters): {_short(discarded)}")


def _load_text(variables: dict, source: str, log: Callable) -> None:
    state, discarded = read_text_state(source)
    loaded = {p: ("/".join(p), np.asarray(v)) for p, v in traverse_util.flatten_dict(state).items()}
    new = graft(traverse_util.flatten_dict(variables["params"]["text"]), loaded, "text tower")
    variables["params"]["text"] = traverse_util.unflatten_dict(
        {p: jax.numpy.asarray(v) for p, v in new.items()})
    log(f"text tower: loaded {len(loaded)} tensors from {source!r}; "
        f"discarded task head {_short(discarded)}")


def load_pretrained(variables: dict, model_config, log: Callable = print) -> dict:
    """Grafts pretrained tower weights named by ``config.model`` into ``variables``.

    Args:
      variables: dict(params=..., batch_stats=...) from ``init_variables``.
      model_config: ``config.model`` (modalities, image_pretrained, text_pretrained).
      log: called with one line per tower and one listing the parameters left new.

    Returns:
      New variables dict (the input is not modified).
    """
    variables = {
        "params": dict(variables["params"]),
        "batch_stats": dict(variables.get("batch_stats", {})),
    }
    loaded_towers = []
    if "image" in model_config.modalities and model_config.image_pretrained:
        _load_image(variables, model_config.image_pretrained, log)
        loaded_towers.append("image")
    if "text" in model_config.modalities and model_config.text_pretrained:
        _load_text(variables, model_config.text_pretrained, log)
        loaded_towers.append("text")
    new = [k for k in variables["params"] if k not in loaded_towers]
    count = sum(x.size for k in new for x in jax.tree.leaves(variables["params"][k]))
    names = [f"{k}/{'/'.join(p)}"
             for k in new for p in traverse_util.flatten_dict(variables["params"][k])]
    log(f"new (randomly initialised) parameters: {count:,} values in {len(names)} tensors: "
        f"{_short(names)}")
    return variables


def _short(names: list[str], n: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n})" if len(names) > n else "")
