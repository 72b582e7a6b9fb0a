"""Tests for jaxmm.models.pretrained and jaxmm.download_weights (tiny towers, no network)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from transformers import (
    DistilBertConfig,
    FlaxDistilBertForMaskedLM,
    FlaxDistilBertModel,
    FlaxResNetModel,
    ResNetConfig,
)

from jaxmm import download_weights, models
from jaxmm.models import pretrained, resnet
from tests.support import model_config

VOCAB, CLASSES, SIZE, LENGTH = 64, 4, 32, 8


def batch(n=2, seed=0):
    rng = np.random.default_rng(seed)
    image = jnp.asarray(rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8))
    ids = jnp.asarray(rng.integers(1, VOCAB, (n, LENGTH), dtype=np.int32))
    return image, ids, jnp.asarray(np.tile([1] * 5 + [0] * (LENGTH - 5), (n, 1)), jnp.int32)

TINY_HF = ResNetConfig(embedding_size=8, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                       layer_type="bottleneck")


def _random_like(shapes, seed=0):
    """Random values for a shape tree (cheaper than a jitted random init on CPU)."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "var" in name or "scale" in name:  # positive, near 1: keeps activations O(1)
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
        fan_in = np.prod(s.shape[:-1]) if len(s.shape) > 1 else 10.0
        return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def hf_resnet_dir(tmp_path_factory):
    """A random tiny FlaxResNetModel with non-trivial running stats, saved in HF format."""
    hf_model = FlaxResNetModel(TINY_HF, _do_init=False)
    params = _random_like(jax.eval_shape(
        lambda: hf_model.init_weights(jax.random.key(0), hf_model.input_shape)))
    out = tmp_path_factory.mktemp("hf_resnet")
    hf_model.save_pretrained(out, params=params)
    return str(out), lambda pixels: hf_model(pixels, params=params)


@pytest.fixture(scope="module")
def tiny_variables():
    """Variables of the tiny model: only their shapes matter for grafting."""
    model = models.build_model(model_config(), CLASSES, VOCAB, None)
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), SIZE, LENGTH))
    return model, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _image_features(variables, image):
    tower = resnet.ResNet("tiny")
    return tower.apply({"params": variables["params"]["image"],
                        "batch_stats": variables["batch_stats"]["image"]}, image, train=False)


def _expected_torchvision_keys():
    """torchvision ResNet key names for the tiny depths, written out independently."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "fc.weight", "fc.bias", *(f"bn1.{s}" for s in bn)}
    for stage in range(1, 5):
        block = f"layer{stage}.0."
        keys |= {block + f"conv{i}.weight" for i in (1, 2, 3)}
        keys |= {block + f"bn{i}.{s}" for i in (1, 2, 3) for s in bn}
        keys |= {block + "downsample.0.weight", *(block + f"downsample.1.{s}" for s in bn)}
    return keys


def test_hf_flax_resnet_round_trip(hf_resnet_dir, tiny_variables):
    path, hf_model = hf_resnet_dir
    cfg = model_config(modalities=("image",), image_pretrained=path)
    logs = []
    loaded = pretrained.load_pretrained(tiny_variables[1], cfg, log=logs.append)
    image = batch()[0]
    ours = _image_features(loaded, image)
    theirs = hf_model(_pixels(image)).pooler_output.reshape(len(image), -1)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    assert any("new (randomly initialised)" in line and "head/" in line for line in logs)
    new_line = next(line for line in logs if line.startswith("new"))
    assert " image/" not in new_line and "text/" in new_line


def _pixels(image):
    """NCHW float pixels normalised with ImageNet's statistics, written out here so that the
    tests pin jaxmm's constants."""
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    return jnp.transpose((np.asarray(image, np.float32) / 255.0 - mean) / std, (0, 3, 1, 2))


_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}


def _torchvision_name(path):
    """HF Flax module path -> torchvision module name, by hand (not jaxmm's converter)."""
    if path[0] == "embedder":
        return {"convolution": "conv1", "normalization": "bn1"}[path[2]]
    stage, block = int(path[2]) + 1, path[4]
    if path[5] == "shortcut":
        return f"layer{stage}.{block}.downsample." + ("0" if path[6] == "convolution" else "1")
    kind = "conv" if path[7] == "convolution" else "bn"
    return f"layer{stage}.{block}.{kind}{int(path[6]) + 1}"


def _torchvision_state(hf_dir):
    """The HF checkpoint's tensors as a torchvision state dict, converted by hand."""
    from flax import serialization, traverse_util

    with open(os.path.join(hf_dir, "flax_model.msgpack"), "rb") as f:
        hf_state = serialization.msgpack_restore(f.read())
    state = {}
    for collection in ("params", "batch_stats"):
        for path, value in traverse_util.flatten_dict(hf_state[collection]).items():
            value = np.asarray(value)
            if value.ndim == 4:
                value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
            state[f"{_torchvision_name(path[:-1])}.{_TORCH_LEAF[path[-1]]}"] = (
                np.ascontiguousarray(value))
    for key in [k for k in state if k.endswith("running_var")]:
        state[key.replace("running_var", "num_batches_tracked")] = np.array(3, np.int64)
    state["fc.weight"] = np.zeros((1000, 256), np.float32)
    state["fc.bias"] = np.zeros((1000,), np.float32)
    return state


def test_torchvision_format_round_trip(hf_resnet_dir, tiny_variables, tmp_path):
    path, hf_model = hf_resnet_dir
    state = _torchvision_state(path)
    assert set(state) == _expected_torchvision_keys()
    save_file(state, str(tmp_path / "tv.safetensors"))
    os.makedirs(tmp_path / "tvdir")
    save_file(state, str(tmp_path / "tvdir" / "model.safetensors"))
    image = batch()[0]
    # The HF model itself is the reference: a mix-up of two torchvision names (conv1/conv3,
    # bn1/bn2, ...) in jaxmm's mapping changes the features.
    theirs = hf_model(_pixels(image)).pooler_output.reshape(len(image), -1)
    for source in (tmp_path / "tv.safetensors", tmp_path / "tvdir"):
        cfg = model_config(image_pretrained=str(source))
        loaded = pretrained.load_pretrained(tiny_variables[1], cfg, log=lambda _: None)
        np.testing.assert_allclose(_image_features(loaded, image), theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.update({"layer1.0.extra.weight": np.zeros(3, np.float32)}), "layer1.0.extra"),
    (lambda s: s.update({"conv1.weight": np.zeros((8, 3, 5, 5), np.float32)}), "conv1.weight"),
    (lambda s: s.pop("layer2.0.conv2.weight"), "not in the checkpoint"),
])
def test_image_checkpoint_problems_raise(hf_resnet_dir, tiny_variables, tmp_path, edit, match):
    state = _torchvision_state(hf_resnet_dir[0])
    edit(state)
    save_file(state, str(tmp_path / "bad.safetensors"))
    cfg = model_config(image_pretrained=str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=match):
        pretrained.load_pretrained(tiny_variables[1], cfg, log=lambda _: None)


def test_hf_pytorch_names_map_to_torchvision():
    names = {"resnet.embedder.embedder.convolution.weight": "conv1.weight",
             "resnet.encoder.stages.2.layers.1.layer.2.normalization.running_var":
                 "layer3.1.bn3.running_var",
             "encoder.stages.0.layers.0.shortcut.convolution.weight":
                 "layer1.0.downsample.0.weight",
             "encoder.stages.3.layers.0.shortcut.normalization.bias": "layer4.0.downsample.1.bias",
             "classifier.1.weight": "fc.1.weight"}
    renamed = resnet.hf_to_torchvision({k: np.full(1, i) for i, k in enumerate(names)})
    # Each tensor under its own new name (a set comparison would let two names swap).
    assert {k: int(v[0]) for k, v in renamed.items()} == {
        new: i for i, new in enumerate(names.values())}


def _tiny_distilbert(**overrides):
    cfg = dict(vocab_size=VOCAB, **models.text.TINY)
    cfg.update(overrides)
    return DistilBertConfig(**cfg)


@pytest.mark.parametrize("head_model", [False, True])
def test_text_round_trip_through_from_pretrained_files(tiny_variables, tmp_path, head_model):
    cls = FlaxDistilBertForMaskedLM if head_model else FlaxDistilBertModel
    cls(_tiny_distilbert(), seed=3).save_pretrained(tmp_path)
    reference = FlaxDistilBertModel.from_pretrained(tmp_path)
    logs = []
    cfg = model_config(modalities=("text",), text_pretrained=str(tmp_path))
    loaded = pretrained.load_pretrained(tiny_variables[1], cfg, log=logs.append)
    _, ids, mask = batch()
    ours = models.text.TextTower(_tiny_distilbert()).apply(
        {"params": loaded["params"]["text"]}, ids, mask, train=False)
    theirs = reference(ids, mask).last_hidden_state[:, 0]
    np.testing.assert_array_equal(ours, theirs)
    assert ("vocab_projector" in logs[0]) == head_model


def test_text_checkpoint_problems_raise(tiny_variables, tmp_path):
    FlaxDistilBertModel(_tiny_distilbert(dim=48), seed=0).save_pretrained(tmp_path / "wide")
    cfg = model_config(text_pretrained=str(tmp_path / "wide"))
    with pytest.raises(ValueError, match="has shape"):
        pretrained.load_pretrained(tiny_variables[1], cfg, log=lambda _: None)
    FlaxDistilBertModel(_tiny_distilbert(n_layers=3), seed=0).save_pretrained(tmp_path / "deep")
    cfg = model_config(text_pretrained=str(tmp_path / "deep"))
    with pytest.raises(ValueError, match="transformer/layer/2"):
        pretrained.load_pretrained(tiny_variables[1], cfg, log=lambda _: None)


def test_uncached_hub_id_gives_download_instructions(tiny_variables):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    cfg = model_config(image_pretrained="jaxmm-test/surely-not-cached-resnet")
    with pytest.raises(pretrained.PretrainedNotFoundError, match="jaxmm.download_weights --out"):
        pretrained.load_pretrained(tiny_variables[1], cfg, log=lambda _: None)
    text_cfg = model_config(text_arch="distilbert", text_pretrained="jaxmm-test/not-cached-bert")
    with pytest.raises(pretrained.PretrainedNotFoundError, match="text weights"):
        models.build_model(text_cfg, CLASSES, VOCAB, None)


def test_distilbert_arch_takes_config_from_checkpoint(tmp_path):
    FlaxDistilBertModel(_tiny_distilbert(vocab_size=80), seed=0).save_pretrained(tmp_path)
    cfg = model_config(text_arch="distilbert", text_pretrained=str(tmp_path))
    assert models.build_model(cfg, CLASSES, VOCAB, None).text_config.dim == 32
    with pytest.raises(ValueError, match="larger than the embedding table"):
        models.build_model(cfg, CLASSES, 81, None)


def test_download_weights_cli_without_network():
    files = ["README.md", "pytorch_model.bin", "model.safetensors", "flax_model.msgpack",
             "config.json", "vocab.txt", "tokenizer.json", "tf_model.h5"]
    assert download_weights.select_files(files) == [
        "model.safetensors", "config.json", "tokenizer.json", "vocab.txt"]
    with pytest.raises(ValueError, match="model.safetensors"):
        download_weights.select_files(["pytorch_model.bin", "config.json"])
    args = download_weights.parse_args(["--out", "w"])
    assert args.out == "w" and args.image_model and args.text_model


def test_safetensors_reader_detects_layout(hf_resnet_dir, tmp_path):
    state = pretrained.read_image_state(hf_resnet_dir[0])
    save_file({"resnet." + k: v for k, v in {"embedder.embedder.convolution.weight":
                                             state["conv1.weight"]}.items()},
              str(tmp_path / "x.safetensors"))
    by_hand = _torchvision_state(hf_resnet_dir[0])["conv1.weight"]  # HWIO -> OIHW by hand
    np.testing.assert_array_equal(state["conv1.weight"], by_hand)
    read = pretrained.read_image_state(str(tmp_path / "x.safetensors"))
    assert list(read) == ["conv1.weight"]
    np.testing.assert_array_equal(read["conv1.weight"], by_hand)
    save_file({"foo.weight": np.zeros(2, np.float32)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ValueError, match="neither an HF-format nor a torchvision"):
        pretrained.read_image_state(str(tmp_path / "y.safetensors"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt", "model.pth", "last.ckpt"])
def test_pickle_checkpoints_are_refused_before_opening(tiny_variables, tmp_path, monkeypatch,
                                                       name):
    FlaxDistilBertModel(_tiny_distilbert(), seed=0).save_pretrained(tmp_path)
    path = tmp_path / name
    path.write_bytes(b"\x80\x04not really a pickle")
    opened = []
    real_open = open

    def spy(file, *args, **kwargs):
        opened.append(os.fspath(file) if not isinstance(file, int) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    import torch

    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    calls = [
        lambda: pretrained.load_pretrained(tiny_variables[1], model_config(
            text_pretrained=str(path)), log=lambda _: None),
        lambda: pretrained.load_pretrained(tiny_variables[1], model_config(
            image_pretrained=str(path)), log=lambda _: None),
        lambda: models.build_model(model_config(text_arch="distilbert",
                                                text_pretrained=str(path)), CLASSES, VOCAB, None),
    ]
    for call in calls:
        with pytest.raises(pretrained.PretrainedFormatError, match="pickle") as err:
            call()
        assert name in str(err.value) and "\n" not in str(err.value)
    assert str(path) not in opened


def test_download_weights_without_network_is_one_line(tmp_path, capsys, monkeypatch):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # huggingface_hub: OfflineModeIsEnabled
    assert download_weights.main(["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the Hugging Face hub" in err
    assert "internet" in err and "login node" in err
    import huggingface_hub
    import requests

    def no_route(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Max retries exceeded (NameResolutionError)")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_route)
    assert download_weights.main(["--out", str(tmp_path)]) == 1
    assert "cannot reach" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
