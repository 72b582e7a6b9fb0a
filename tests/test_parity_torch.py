"""Parity of jaxmm's towers with the PyTorch reference models (random init, fp32, eval mode).

Random-init PyTorch models are saved in the formats users have (HF ``save_pretrained``
safetensors, torchvision-named safetensors), loaded through jaxmm's loaders, and their pooled
features compared on the same inputs. Skipped when torch is not installed.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxmm.models import build_model, pretrained, resnet, text

torch = pytest.importorskip("torch", reason="parity tests need PyTorch (CPU build is enough)")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
IMAGE_SIZE, BATCH = 64, 2


def _config(**overrides):
    cfg = dict(modalities=("image", "text"), image_arch="resnet50", image_pretrained="",
               text_arch="distilbert", text_pretrained="", text_pooling="cls",
               fusion="concat", proj_dim=8, hidden_dim=8, dropout=0.0,
               modality_dropout=0.0, dtype="float32", freeze_image=False, freeze_text=False)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def _zero_variables(model, length=8):
    """Variables of the right shapes without paying for random initialisation."""
    args = (jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.uint8),
            jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), jnp.int32))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, train=False))
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _randomise_batchnorm(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) * 0.3 + 0.1)  # keep features O(1)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)


def _images():
    return np.random.default_rng(0).integers(0, 256, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def _torch_pixels(images):
    return torch.from_numpy(np.array(resnet.normalize_images(images))).permute(0, 3, 1, 2)


def _jax_image_features(source):
    model = build_model(_config(modalities=("image",), image_pretrained=source), 4, 10, None)
    variables = pretrained.load_pretrained(_zero_variables(model), _config(
        modalities=("image",), image_pretrained=source), log=lambda _: None)
    tower = resnet.ResNet("resnet50")
    apply = jax.jit(lambda v, x: tower.apply(v, x, train=False))
    return np.asarray(apply({"params": variables["params"]["image"],
                             "batch_stats": variables["batch_stats"]["image"]}, _images()))


def _hf_to_torchvision_by_hand(name):
    """Independent renaming HF ResNetModel -> torchvision, for the torchvision-format test."""
    parts = name.split(".")
    if parts[0] == "embedder":
        return ("conv1." if parts[2] == "convolution" else "bn1.") + parts[-1]
    stage, block = int(parts[2]) + 1, parts[4]
    if parts[5] == "shortcut":
        sub = "downsample.0" if parts[6] == "convolution" else "downsample.1"
    else:
        sub = ("conv" if parts[7] == "convolution" else "bn") + str(int(parts[6]) + 1)
    return f"layer{stage}.{block}.{sub}.{parts[-1]}"


@pytest.fixture(scope="module")
def torch_resnet():
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(transformers.ResNetConfig()).eval()
    _randomise_batchnorm(model)
    with torch.no_grad():
        feats = model.resnet(_torch_pixels(_images())).pooler_output.flatten(1).numpy()
    return model, feats


@pytest.mark.slow
def test_resnet50_hf_safetensors_parity(torch_resnet, tmp_path):
    model, reference = torch_resnet
    model.save_pretrained(tmp_path)
    ours = _jax_image_features(str(tmp_path))
    diff = np.abs(ours - reference).max()
    scale = np.abs(reference).max()
    print(f"ResNet-50 HF-format max abs diff {diff:.2e} (feature scale {scale:.2f})")
    assert diff <= TOL


@pytest.mark.slow
def test_resnet50_torchvision_format_parity(torch_resnet, tmp_path):
    from safetensors.torch import save_file

    model, reference = torch_resnet
    state = {_hf_to_torchvision_by_hand(k): v.contiguous()
             for k, v in model.resnet.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    save_file(state, str(tmp_path / "resnet50_tv.safetensors"))
    diff = np.abs(_jax_image_features(str(tmp_path / "resnet50_tv.safetensors")) - reference).max()
    print(f"ResNet-50 torchvision-format max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.slow
def test_resnet50_real_torchvision_parity(tmp_path):
    torchvision = pytest.importorskip(
        "torchvision", reason="torchvision is not installed (no build matches this torch)")
    from safetensors.torch import save_file

    model = torchvision.models.resnet50(weights=None).eval()
    _randomise_batchnorm(model)
    with torch.no_grad():
        model.fc = torch.nn.Identity()
        reference = model(_torch_pixels(_images())).numpy()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "tv.safetensors"))
    assert np.abs(_jax_image_features(str(tmp_path / "tv.safetensors")) - reference).max() <= TOL


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_distilbert_parity(tmp_path, pooling):
    torch.manual_seed(0)
    # Real width, fewer layers and a small vocabulary keep this fast; the mapping is the same.
    cfg = transformers.DistilBertConfig(vocab_size=1000, n_layers=2)
    model = transformers.DistilBertModel(cfg).eval()
    model.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (BATCH, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        hidden = model(torch.from_numpy(ids).long(),
                       attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    reference = text.pool(jnp.asarray(hidden), jnp.asarray(mask), pooling)
    mc = _config(modalities=("text",), text_pretrained=str(tmp_path), text_pooling=pooling)
    classifier = build_model(mc, 4, cfg.vocab_size, None)
    variables = pretrained.load_pretrained(_zero_variables(classifier), mc, log=lambda _: None)
    tower = text.TextTower(classifier.text_config, pooling=pooling)
    ours = jax.jit(lambda p: tower.apply({"params": p}, ids, mask, train=False))(
        variables["params"]["text"])
    diff = float(jnp.abs(ours - reference).max())
    print(f"DistilBERT ({pooling}) max abs diff {diff:.2e}")
    assert diff <= TOL
