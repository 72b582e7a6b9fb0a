"""Starting the server: load and check the bundle, bind, compile in the background, serve until
SIGTERM or Ctrl-C, then finish what is in flight and return (exit code 0)."""

import ipaddress
import logging
import signal
import socket

from jaxmm.serving.app import Settings, create_app
from jaxmm.serving.engine import Engine

__all__ = ["Settings", "serve"]
log = logging.getLogger("jaxmm")
GRACE_SECONDS = 30  # in-flight requests get this long after SIGTERM


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port).

    Raises:
      OSError: the address cannot be bound (in use, unknown host).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def serve(bundle_dir: str, host: str, port: int, settings: Settings, calibrated: bool = True,
          cache_dir: str | None = None) -> None:
    """Serves a bundle until SIGTERM or SIGINT (see ``jaxmm.serve``)."""
    import uvicorn

    from jaxmm.errors import ConfigError

    engine = Engine(bundle_dir, settings.max_batch, calibrated, cache_dir)
    try:
        sock = bind(host, port)
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})"
                          ) from None
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    if not _is_loopback(host):
        print(f"listening on {host}: anyone who reaches port {port} can use the model"
              + ("" if settings.token else " (no --token set)"), flush=True)
        shown = socket.gethostname() if host in ("0.0.0.0", "::") else shown
    url = f"http://{shown}:{port}/"
    explain = "with explanations" if engine.can_explain else \
        "without explanations (export with --explain to have them)"
    print(f"model {engine.model_id} ({len(engine.class_names)} classes, {explain}); compiling "
          f"batch sizes {engine.sizes}", flush=True)

    def ready():
        print(f"ready: {url}", flush=True)

    config = uvicorn.Config(create_app(engine, settings, on_ready=ready), log_level="warning",
                            access_log=False, timeout_graceful_shutdown=GRACE_SECONDS)
    server = uvicorn.Server(config)
    stopped = []
    # uvicorn handles the signals while it runs and raises them again once it has shut down
    # gracefully; these handlers then only note it, so the process exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: stopped.append(number))
    server.run(sockets=[sock])
    by = f" by {signal.Signals(stopped[0]).name}" if stopped else ""
    print(f"stopped{by}; requests in flight were answered", flush=True)
