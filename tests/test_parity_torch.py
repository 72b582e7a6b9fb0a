"""Parity of jaxmm's towers with the PyTorch reference models (random init, fp32, eval mode).

Random-init PyTorch models are saved in the formats users have (HF ``save_pretrained``
safetensors, torchvision-named safetensors), loaded through jaxmm's loaders, and their pooled
features compared on the same inputs; the references normalise pixels and pool tokens by
hand. Skipped when torch is not installed.
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


# ImageNet statistics, written out here so that the parity tests pin jaxmm's constants.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _torch_pixels(images):
    x = (images.astype(np.float32) / 255.0 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    return torch.from_numpy(x).permute(0, 3, 1, 2)


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


class _TvBottleneck(torch.nn.Module):
    """torchvision's ``resnet.Bottleneck`` (v1.5: stride on the 3x3), same attribute names."""

    def __init__(self, inplanes, width, stride):
        super().__init__()
        conv = lambda i, o, k, s=1: torch.nn.Conv2d(i, o, k, s, padding=k // 2, bias=False)
        self.conv1, self.bn1 = conv(inplanes, width, 1), torch.nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv(width, width, 3, stride), torch.nn.BatchNorm2d(width)
        self.conv3, self.bn3 = conv(width, width * 4, 1), torch.nn.BatchNorm2d(width * 4)
        self.downsample = None
        if stride != 1 or inplanes != width * 4:
            self.downsample = torch.nn.Sequential(conv(inplanes, width * 4, 1, stride),
                                                  torch.nn.BatchNorm2d(width * 4))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class _TorchvisionResNet50(torch.nn.Module):
    """torchvision's ``models.resnet50()`` written out in plain torch: its ``state_dict()`` has
    torchvision's key names and tensors (``num_batches_tracked`` and ``fc`` included), so the
    format is tested without torchvision, which has no build for the pinned torch."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(64)
        inplanes = 64
        for i, (depth, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
            blocks = []
            for b in range(depth):
                blocks.append(_TvBottleneck(inplanes, width, 2 if b == 0 and i > 0 else 1))
                inplanes = width * 4
            setattr(self, f"layer{i + 1}", torch.nn.Sequential(*blocks))
        self.fc = torch.nn.Linear(2048, 1000)

    def features(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.nn.functional.max_pool2d(x, 3, 2, padding=1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x.mean((2, 3))


def test_torchvision_resnet50_keys_are_torchvision_s():
    """The stand-in's keys are those of torchvision's ``resnet50().state_dict()``: 320 entries,
    53 of them BatchNorm counters, in module order."""
    keys = list(_TorchvisionResNet50().state_dict())
    assert len(keys) == 320 and sum(k.endswith("num_batches_tracked") for k in keys) == 53
    assert keys[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
                        "bn1.running_var", "bn1.num_batches_tracked"]
    assert "layer3.0.downsample.1.running_var" in keys and "layer4.2.conv3.weight" in keys
    assert keys[-2:] == ["fc.weight", "fc.bias"]


@pytest.mark.slow
def test_resnet50_torchvision_state_dict_parity(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = _TorchvisionResNet50().eval()
    _randomise_batchnorm(model)
    with torch.no_grad():
        reference = model.features(_torch_pixels(_images())).numpy()
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
    if pooling == "cls":
        reference = hidden[:, 0]
    else:  # the mean over real tokens only
        reference = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    mc = _config(modalities=("text",), text_pretrained=str(tmp_path), text_pooling=pooling)
    classifier = build_model(mc, 4, cfg.vocab_size, None)
    variables = pretrained.load_pretrained(_zero_variables(classifier), mc, log=lambda _: None)
    tower = text.TextTower(classifier.text_config, pooling=pooling)
    ours = jax.jit(lambda p: tower.apply({"params": p}, ids, mask, train=False))(
        variables["params"]["text"])
    diff = float(jnp.abs(ours - reference).max())
    print(f"DistilBERT ({pooling}) max abs diff {diff:.2e}")
    assert diff <= TOL
