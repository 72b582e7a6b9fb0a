"""ASGI guards in front of the routes: metrics, access token, per-client rate limit and the
upload size limit. Each is a plain ASGI middleware, so that it acts before a route reads the
body: an oversized upload is refused as soon as its declared length or its received chunks
pass the limit, without reading the rest.
"""

import hmac
import ipaddress
import json
import math
import time

# Routes whose use is limited (token, rate); the page, /healthz and /readyz stay open.
GUARDED = ("/v1/", "/metrics")


async def refuse(send, status: int, message: str, headers=()) -> None:
    """Sends a JSON error answer {"error": message}."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            *[(k.encode(), v.encode()) for k, v in headers]]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _guarded(scope) -> bool:
    return scope["type"] == "http" and scope["path"].startswith(GUARDED)


class BodyLimit:
    """413 for a request body over ``max_bytes``, declared (Content-Length) or streamed
    (chunked); the body is read into memory only up to the limit, then handed on whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> str:
        return (f"the upload is larger than the server's limit of {self.max_bytes:,} bytes; "
                "send a smaller photo (or start the server with a larger --max_upload_mb)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await refuse(send, 413 if declared.isdigit() else 400,
                                self._too_large() if declared.isdigit()
                                else "Content-Length is not a number")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await refuse(send, 413, self._too_large())
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class AccessToken:
    """401 on the guarded routes unless the request carries ``Authorization: Bearer TOKEN``."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send):
        if _guarded(scope) and scope["method"] != "OPTIONS":
            given = (_header(scope, b"authorization") or "").encode()
            if not hmac.compare_digest(given, b"Bearer " + self.token):
                return await refuse(send, 401, "this server needs its access token: send the "
                                    "header 'Authorization: Bearer TOKEN'",
                                    [("www-authenticate", "Bearer")])
        return await self.app(scope, receive, send)


def _loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RateLimit:
    """429 with Retry-After when a client (by address) sends more than ``per_minute`` requests
    a minute to the guarded routes (a token bucket holding a minute's worth). Clients on the
    loopback interface (this machine, or an ssh tunnel) are not limited."""

    MAX_CLIENTS = 10_000  # forgets clients with full buckets beyond this many

    def __init__(self, app, per_minute: float):
        self.app, self.rate, self.capacity = app, per_minute / 60.0, max(1.0, per_minute)
        self.buckets: dict[str, tuple[float, float]] = {}

    def _take(self, client: str) -> float:
        """0 when the request may go, else the seconds until it may."""
        now = time.monotonic()
        tokens, then = self.buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.rate)
        if tokens < 1:
            self.buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate
        self.buckets[client] = (tokens - 1, now)
        if len(self.buckets) > self.MAX_CLIENTS:
            self.buckets = {k: v for k, v in self.buckets.items() if v[0] < self.capacity - 1}
        return 0.0

    async def __call__(self, scope, receive, send):
        client = (scope.get("client") or (None, None))[0]
        if _guarded(scope) and not _loopback(client):
            wait = self._take(str(client))
            if wait:
                return await refuse(send, 429, f"too many requests from {client}: at most "
                                    f"{self.rate * 60:g} a minute",
                                    [("retry-after", str(math.ceil(wait)))])
        return await self.app(scope, receive, send)


class Metrics:
    """Counts requests by route and status and times them (Prometheus)."""

    def __init__(self, app, requests, latency, routes):
        self.app, self.requests, self.latency, self.routes = app, requests, latency, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
        status, start = 500, time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.requests.labels(route, str(status)).inc()
            self.latency.labels(route).observe(time.perf_counter() - start)
