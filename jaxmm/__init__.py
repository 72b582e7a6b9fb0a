"""jaxmm: a JAX/Flax image + text classifier that sorts garbage into bins.

Entry points: ``python -m jaxmm.train``, ``python -m jaxmm.evaluate``, ``python -m jaxmm.predict``,
``python -m jaxmm.prepare`` and ``python -m jaxmm.data.synthetic``.
"""

__version__ = "0.1.0"
