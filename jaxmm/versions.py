"""Versions of jaxmm and of the packages it runs with, as runs and bundles record them."""

import importlib.metadata

# What a training run records in its run record.
TRAINING = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets",
            "transformers", "numpy")
# What a bundle is written and run with (Pillow: JPEG re-encoding and resampling can differ
# between builds).
BUNDLE = ("jax", "jaxlib", "flax", "numpy", "pillow", "safetensors", "tokenizers",
          "transformers", "flatbuffers")


def package_versions(names) -> dict:
    """{"jaxmm": version, name: version or None (not installed), ...}."""
    from jaxmm import __version__

    out = {"jaxmm": __version__}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out
