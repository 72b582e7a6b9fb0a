"""Image tower: a linen ResNet-50 v1.5 (and a tiny variant) plus weight-name converters.

The tower is written here rather than reusing transformers' ``FlaxResNetModule`` because its
BatchNorm layers must take an ``axis_name`` (statistics synchronised across pmap devices), and
because two checkpoint layouts have to load into it: HF-format ``ResNetModel`` weights and
torchvision-format state dicts. Module names follow torchvision (``conv1``, ``bn1``,
``layer1_0/conv1`` ...), so each layout needs one key-mapping converter.

v1.5 means the stride-2 convolution of a downsampling block is the 3x3 one (torchvision, HF
``downsample_in_bottleneck=False``), not the first 1x1.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxmm.errors import ConfigError
from jaxmm.models import batchnorm as fused_batchnorm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# depths: bottleneck blocks per stage; widths: bottleneck (3x3) channels; output = 4 * width.
ARCHS = {
    "resnet50": {"depths": (3, 4, 6, 3), "widths": (64, 128, 256, 512)},
    "tiny": {"depths": (1, 1, 1, 1), "widths": (8, 16, 32, 64)},
}
EXPANSION = 4
# Name under which the last convolutional stage's output [B,h,w,C] is sown and perturbed.
LAST_STAGE = "last_stage"

# torchvision / timm classifier and HF ``ResNetForImageClassification`` head: ImageNet-only.
IMAGE_TASK_HEADS = ("fc", "classifier")

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

def batchnorm_group_size(sync: str) -> int:
    """Devices that share BatchNorm statistics: 0 = all ("global"), 1 = none ("device"), N.

    Raises:
      ConfigError: one line naming ``config.batchnorm_sync``, for any other value.
    """
    if sync == "global":
        return 0
    if sync == "device":
        return 1
    size = sync.removeprefix("group:") if isinstance(sync, str) else ""
    if size == sync or not size.isdigit() or int(size) < 1:
        raise ConfigError(f"config.batchnorm_sync={sync!r}: choose 'global', 'device' or "
                          "'group:N' (N consecutive devices share statistics; N >= 1)")
    return int(size)


def batchnorm_groups(sync: str, device_count: int) -> list[list[int]] | None:
    """``axis_index_groups`` of a BatchNorm synchronised by ``sync`` over ``device_count``
    devices: None for every device at once, else groups of consecutive device indices.

    Raises:
      ConfigError: one line naming ``config.batchnorm_sync`` when N does not divide the count.
    """
    size = batchnorm_group_size(sync)
    if size in (0, device_count):
        return None
    if device_count % size:
        raise ConfigError(f"config.batchnorm_sync={sync!r}: {size} does not divide the "
                          f"{device_count} devices of this run")
    return [list(range(g, g + size)) for g in range(0, device_count, size)]


def _norm_relu(norm, fused: bool, name: str, x: jnp.ndarray, residual=None) -> jnp.ndarray:
    """relu(norm(x) [+ residual]); the fused BatchNorm does all of it in one custom VJP."""
    if fused:
        return norm(name=name, relu=True)(x, residual=residual)
    y = norm(name=name)(x)
    return nn.relu(y if residual is None else y + residual)


def normalize_images(images: jnp.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jnp.ndarray:
    """Maps uint8 (or float 0..255) NHWC images to float32 (x / 255 - mean) / std per channel
    (ImageNet's statistics by default)."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck block (stride on the 3x3 convolution)."""

    width: int
    stride: int
    use_projection: bool
    norm: Any
    dtype: Any = jnp.float32
    fused: bool = False  # norm is the fused BatchNorm (it also applies the ReLUs)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=_conv_init,
        )
        s = (self.stride, self.stride)
        y = _norm_relu(self.norm, self.fused, "bn1", conv(self.width, (1, 1), name="conv1")(x))
        y = conv(self.width, (3, 3), strides=s, padding=((1, 1), (1, 1)), name="conv2")(y)
        y = _norm_relu(self.norm, self.fused, "bn2", y)
        y = conv(self.width * EXPANSION, (1, 1), name="conv3")(y)
        residual = x
        if self.use_projection:
            residual = conv(self.width * EXPANSION, (1, 1), strides=s, name="downsample_conv")(x)
            residual = self.norm(name="downsample_bn")(residual)
        return _norm_relu(self.norm, self.fused, "bn3", y, residual)


# Values of config.model.stem: the 7x7 stride-2 convolution as written, or the same
# convolution computed on a space-to-depth view of the image (training only; same parameter).
STEMS = ("conv", "space_to_depth")


def space_to_depth_stem(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """The stem's 7x7 stride-2 convolution (padding 3) as a 4x4 stride-1 convolution over 2x2
    blocks of pixels: the same sums, with 4x the input channels (12 instead of 3), which GPU
    convolution kernels use far better than 3 (they pad channels to a multiple of 8).

    With p the image padded by 3 and k the kernel padded to 8x8 with zeros,
    out[i] = sum_{a<4, b<2} p[2(i + a) + b] k[2a + b] per spatial axis: a stride-1 convolution of
    the blocks z[j, b] = p[2j + b] with the kernel k'[a, b] = k[2a + b].

    Args:
      x: [B, H, W, C] with even H and W.
      kernel: [7, 7, C, F] (HWIO), the stem convolution's own parameter.

    Returns:
      [B, H/2, W/2, F], equal to the strided convolution up to float round-off.
    """
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"the space-to-depth stem needs an even image size, got {h}x{w}")
    p = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))  # (h + 6) is even: whole 2x2 blocks
    z = p.reshape(b, (h + 6) // 2, 2, (w + 6) // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    z = z.reshape(b, (h + 6) // 2, (w + 6) // 2, 4 * c)
    f = kernel.shape[-1]
    k = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))  # 8x8: tap 7 is zero
    k = k.reshape(4, 2, 4, 2, c, f).transpose(0, 2, 1, 3, 4, 5).reshape(4, 4, 4 * c, f)
    return jax.lax.conv_general_dilated(z, k, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class SpaceToDepthStem(nn.Module):
    """The stem convolution computed by ``space_to_depth_stem``. Its one parameter is the one
    ``nn.Conv`` would create for the 7x7 stride-2 stem (same name, shape and initialiser), so
    either way of computing the stem trains, saves and loads the same tree."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", _conv_init, (7, 7, x.shape[-1], self.features),
                            jnp.float32)
        return space_to_depth_stem(x.astype(self.dtype), kernel.astype(self.dtype))


class ResNet(nn.Module):
    """ResNet image tower returning global-average-pooled float32 features.

    Attributes:
      arch: key of ``ARCHS`` ('resnet50' or 'tiny').
      dtype: compute dtype (parameters are always float32).
      axis_name: pmap axis over which training BatchNorm statistics are averaged (None: local).
      frozen: if True, BatchNorm always uses (and never updates) the running averages.
      mean, std: per-channel input normalisation of x / 255 (the pretrained weights' own).
      batchnorm_sync: which devices of ``axis_name`` share training statistics: "global"
        (all), "device" (none: each device normalises over its own rows) or "group:N" (N
        consecutive devices). Inference never uses it (it reads the running averages).
      batchnorm: "flax" (``flax.linen.BatchNorm``) or "fused" (``models.batchnorm.BatchNorm``,
        with the ReLUs and residual adds, where batch statistics are computed). Same variables
        and results; inference and frozen towers always use flax's.
      stem: "conv" (``nn.Conv``) or "space_to_depth" (``SpaceToDepthStem``: the same
        convolution and parameter) in training; inference always uses "conv".
    """

    arch: str = "resnet50"
    dtype: Any = jnp.float32
    axis_name: str | None = None
    frozen: bool = False
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    batchnorm_sync: str = "global"
    batchnorm: str = "flax"
    stem: str = "conv"

    def _norm_axis(self) -> tuple[str | None, list | None]:
        """(axis_name, axis_index_groups) of the training BatchNorm statistics."""
        if self.axis_name is None or batchnorm_group_size(self.batchnorm_sync) == 1:
            return None, None
        # The pmap axis size is static while tracing: the groups follow the actual devices.
        return self.axis_name, batchnorm_groups(self.batchnorm_sync,
                                                jax.lax.axis_size(self.axis_name))

    @nn.compact
    def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Args: images uint8/float [B,H,W,3] in 0..255. Returns: float32 [B, features]."""
        spec = ARCHS[self.arch]
        use_avg = self.frozen or not train
        # Outside a pmap the axis is unbound, so it is only named when batch stats are computed.
        axis_name, groups = (None, None) if use_avg else self._norm_axis()
        # The running-average path is flax's in any case: inference does not depend on the switch.
        fused = self.batchnorm == "fused" and not use_avg
        norm = functools.partial(
            fused_batchnorm.BatchNorm if fused else nn.BatchNorm, use_running_average=use_avg,
            momentum=0.9, epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32,
            axis_name=axis_name,
            axis_index_groups=groups,
        )
        x = normalize_images(images, self.mean, self.std).astype(self.dtype)
        if self.stem == "space_to_depth" and train:
            x = SpaceToDepthStem(spec["widths"][0], dtype=self.dtype, name="conv1")(x)
        else:
            x = nn.Conv(spec["widths"][0], (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                        use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=_conv_init, name="conv1")(x)
        x = _norm_relu(norm, fused, "bn1", x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (depth, width) in enumerate(zip(spec["depths"], spec["widths"], strict=True)):
            for block in range(depth):
                stride = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(width, stride, block == 0, norm, self.dtype, fused,
                               name=f"layer{stage + 1}_{block}")(x)
        if not self.is_initializing():
            # Hooks for Grad-CAM (jaxmm.evaluation.explain): both are no-ops unless the caller
            # passes a 'perturbations' collection or makes 'intermediates' mutable; never created
            # at init.
            x = self.perturb(LAST_STAGE, x)
            self.sow("intermediates", LAST_STAGE, x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# ----------------------------------------------------------------------------- converters
# Canonical intermediate form: a flat dict of torchvision names -> arrays in PyTorch layout.

_HF_STEM = re.compile(r"^embedder\.embedder\.(convolution|normalization)\.(\w+)$")
_HF_BLOCK = re.compile(
    r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:layer\.(\d+)|(shortcut))\."
    r"(convolution|normalization)\.(\w+)$"
)


def _hf_name_to_torchvision(name: str) -> str | None:
    """Maps one HF ``ResNetModel`` key (no 'resnet.' prefix) to torchvision; None if unknown."""
    m = _HF_STEM.match(name)
    if m:
        return ("conv1." if m[1] == "convolution" else "bn1.") + m[2]
    m = _HF_BLOCK.match(name)
    if not m:
        return None
    prefix = f"layer{int(m[1]) + 1}.{m[2]}."
    if m[4]:  # shortcut
        return prefix + ("downsample.0." if m[5] == "convolution" else "downsample.1.") + m[6]
    idx = int(m[3]) + 1
    return prefix + (f"conv{idx}." if m[5] == "convolution" else f"bn{idx}.") + m[6]


def hf_to_torchvision(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames an HF-format ResNet state dict (PyTorch names and layout) to torchvision names.

    Args:
      state: keys like 'embedder.embedder.convolution.weight', optionally prefixed 'resnet.'
        (``ResNetForImageClassification``), whose 'classifier.*' head becomes 'fc.*'.

    Returns:
      The same arrays keyed by torchvision names; unknown keys are kept unchanged so that the
      graft reports them as unused.
    """
    out = {}
    for key, value in state.items():
        name = key.removeprefix("resnet.")
        if name.startswith("classifier."):
            out["fc." + name.removeprefix("classifier.")] = value
            continue
        out[_hf_name_to_torchvision(name) or key] = value
    return out


_FLAX_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                       "mean": "running_mean", "var": "running_var"}


def hf_flax_to_torch_layout(state: dict) -> dict[str, np.ndarray]:
    """Turns a ``FlaxResNetModel`` msgpack state ({params, batch_stats}) into HF PyTorch names.

    Conv kernels go from HWIO to OIHW so that one converter handles both HF layouts.
    """
    out = {}
    for collection in ("params", "batch_stats"):
        for path, value in traverse_util.flatten_dict(state.get(collection, {})).items():
            leaf = _FLAX_LEAF_TO_TORCH.get(path[-1], path[-1])
            value = np.asarray(value)
            if path[-1] == "kernel" and value.ndim == 4:
                value = value.transpose(3, 2, 0, 1)
            elif path[-1] == "kernel" and value.ndim == 2:
                value = value.T
            # Contiguous, because safetensors.numpy silently mis-saves transposed views.
            out[".".join((*path[:-1], leaf))] = np.ascontiguousarray(value)
    return out


_TV_KEY = re.compile(
    r"^(?:(conv1|bn1)|layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1))\.(\w+)$"
)
_TV_LEAF = {"weight": ("params", None), "bias": ("params", "bias"),
            "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def torchvision_to_linen(
    state: dict[str, np.ndarray],
) -> tuple[dict[tuple, tuple[str, str, np.ndarray]], list[str]]:
    """Maps torchvision-named PyTorch tensors onto this module's variables.

    Args:
      state: flat torchvision state dict (conv1.weight, layer1.0.downsample.1.running_var ...).

    Returns:
      (mapped, discarded): mapped[(collection, *path)] = (source key, array in linen layout);
      discarded lists the ImageNet head and ``num_batches_tracked`` keys. Keys matching no
      pattern are mapped to ('unknown', key) so the graft rejects them by name.
    """
    mapped, discarded = {}, []
    for key, value in state.items():
        if key.split(".")[0] in IMAGE_TASK_HEADS or key.endswith("num_batches_tracked"):
            discarded.append(key)
            continue
        m = _TV_KEY.match(key)
        if not m or m[5] not in _TV_LEAF:
            mapped[("unknown", key)] = (key, np.asarray(value))
            continue
        module = m[1] or m[4]
        module = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(
            module, module)
        path = (module,) if m[1] else (f"layer{m[2]}_{m[3]}", module)
        collection, leaf = _TV_LEAF[m[5]]
        value = np.asarray(value)
        if leaf is None:  # 'weight': conv kernel (OIHW -> HWIO) or BatchNorm scale
            leaf, value = ("kernel", value.transpose(2, 3, 1, 0)) if value.ndim == 4 else (
                "scale", value)
        mapped[(collection, *path, leaf)] = (key, value)
    return mapped, discarded
