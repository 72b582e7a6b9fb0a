"""jaxmm: a JAX/Flax image + text classifier that sorts garbage into bins.

Entry points: ``python -m jaxmm.train``, ``python -m jaxmm.evaluate``, ``python -m jaxmm.predict``,
``python -m jaxmm.export``, ``python -m jaxmm.prepare`` and ``python -m jaxmm.data.synthetic``.
Python API: ``jaxmm.Classifier.load(bundle_dir).predict(images, texts)`` (see
``jaxmm.trained.classifier``).
"""

__version__ = "0.1.0"
__all__ = ["Classifier"]


def __getattr__(name):
    # Lazy, so that `import jaxmm` (and every entry point) stays cheap: the bundle reader
    # imports jax only when the Classifier is first used.
    if name == "Classifier":
        from jaxmm.trained.classifier import Classifier

        return Classifier
    raise AttributeError(f"module 'jaxmm' has no attribute {name!r}")
