"""Serving a bundle over HTTP (``python -m jaxmm.serve``): the model with fixed batch shapes
(``engine``), request decoding and its limits (``inputs``), micro-batching (``batching``), the
ASGI guards (``guards``: body size, access token, rate limit, metrics), the routes (``app``) and
the web page (``page/``). Nothing here imports flax or a training package."""
