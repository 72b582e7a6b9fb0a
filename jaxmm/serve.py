"""Serves an export bundle over HTTP: an API with micro-batching and a web page.

    python -m jaxmm.serve --model garbage_model [--host 127.0.0.1] [--port 8000]
        [--max_batch 32] [--max_wait_ms 10] [--unsure_below 0.5] [--token T]

Loads and checks the bundle, compiles every batch shape, then prints the URL: the page at
``/``, the API under ``/v1`` (``/docs`` describes it), ``/healthz``, ``/readyz``, ``/metrics``.
It binds the loopback interface unless ``--host`` says otherwise. SIGTERM or Ctrl-C: stop
accepting, finish what is in flight, exit 0. Needs ``pip install .[serve]``; imports neither
flax nor any training package (docs/serving.md).
"""

from absl import flags

from jaxmm import cli
from jaxmm.errors import ConfigError

_MODEL = flags.DEFINE_string("model", None, "Bundle folder written by jaxmm.export (with "
                             "--explain for explanations and per-tower probabilities).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to bind; another than loopback "
                            "only when you mean it (then consider --token).")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port (0: any free port).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 32, "Most images per device batch.")
_MAX_WAIT = flags.DEFINE_float("max_wait_ms", 10.0, "How long the oldest waiting image waits "
                               "for others before its batch runs.")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 256, "Most images waiting; beyond, 503 with "
                                  "Retry-After.")
_UNSURE = flags.DEFINE_float("unsure_below", 0.5, "Answers with a lower (calibrated) "
                             "confidence are marked unsure.")
_MAX_UPLOAD = flags.DEFINE_float("max_upload_mb", 10.0, "Largest request body, in MiB (413 "
                                 "beyond, before the rest is read).")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 16, "Most images in one request.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Threads that decode and preprocess uploads.")
_TOKEN = flags.DEFINE_string("token", "", "Access token the /v1 routes and /metrics require "
                             "('Authorization: Bearer TOKEN'); default: none.")
_CORS = flags.DEFINE_list("cors_origins", [], "Origins allowed to call the API from their "
                          "pages (CORS); default: none.")
_RATE = flags.DEFINE_float("rate_limit", 120.0, "Requests a minute per client address, except "
                           "loopback clients; 0: no limit.")
_NO_CALIBRATION = flags.DEFINE_bool("no_calibration", False, "Raw probabilities even when the "
                                    "bundle has a temperature.")
flags.mark_flag_as_required("model")


def main(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    for name, value, low in (("max_batch", _MAX_BATCH.value, 1), ("max_queue", _MAX_QUEUE.value,
                             1), ("max_images", _MAX_IMAGES.value, 1), ("workers",
                             _WORKERS.value, 1), ("port", _PORT.value, 0)):
        if value < low:
            raise ConfigError(f"--{name}={value} must be at least {low}")
    if not 0 <= _UNSURE.value <= 1 or _MAX_WAIT.value < 0 or _MAX_UPLOAD.value <= 0:
        raise ConfigError("--unsure_below must be in [0, 1], --max_wait_ms >= 0 and "
                          "--max_upload_mb > 0")
    try:
        from jaxmm.serving import server
    except ImportError as e:
        raise ConfigError(f"the server needs its packages ({e.name} is missing): pip install "
                          "'.[serve]' or -r requirements-serve.txt") from None

    server.serve(_MODEL.value, _HOST.value, _PORT.value, server.Settings(
        max_batch=_MAX_BATCH.value, max_wait_ms=_MAX_WAIT.value, max_queue=_MAX_QUEUE.value,
        unsure_below=_UNSURE.value, max_upload_bytes=int(_MAX_UPLOAD.value * (1 << 20)),
        max_images=_MAX_IMAGES.value, workers=_WORKERS.value, token=_TOKEN.value,
        cors_origins=tuple(_CORS.value), rate_limit=_RATE.value),
        calibrated=not _NO_CALIBRATION.value)


def run():
    """Console-script entry point (``jaxmm-serve``)."""
    cli.run(main, "jaxmm.serve")


if __name__ == "__main__":
    run()
