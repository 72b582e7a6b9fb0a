"""The HTTP API and the web page of ``python -m jaxmm.serve`` (FastAPI on uvicorn).

Routes: ``POST /v1/predict`` and ``POST /v1/explain`` (multipart or JSON with base64 images),
``GET /v1/model``, ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus), ``/openapi.json`` and
``/docs`` (rendered here: the compute nodes it runs on have no internet for a CDN), and the page
at ``/``. Decoding and preprocessing run on a thread pool, the model on its one device thread
behind the ``MicroBatcher``; the event loop only moves bytes. Errors are {"error": one line}.
"""

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import logging
import os

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser
from starlette.middleware.cors import CORSMiddleware

from jaxmm import __version__
from jaxmm.serving import guards, schemas
from jaxmm.serving.batching import MicroBatcher, QueueFull
from jaxmm.serving.engine import HOW_TO_EXPLAIN, Engine
from jaxmm.serving.inputs import InputProblem, decode_base64, decode_image, texts_for

log = logging.getLogger("jaxmm")
PAGE = os.path.join(os.path.dirname(__file__), "page", "index.html")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the server's flags set (``python -m jaxmm.serve --help`` describes each)."""

    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_queue: int = 256
    unsure_below: float = 0.5
    max_upload_bytes: int = 10 << 20
    max_images: int = 16
    workers: int = 2
    token: str = ""
    cors_origins: tuple = ()
    rate_limit: float = 120.0


class _State:
    def __init__(self, engine: Engine, settings: Settings):
        self.engine, self.settings, self.ready = engine, settings, False
        self.pool = concurrent.futures.ThreadPoolExecutor(settings.workers,
                                                          thread_name_prefix="preprocess")
        self.batches = 0
        self.explaining = asyncio.Semaphore(4)
        self.metrics = schemas.metrics(engine.sizes)
        self.batcher = MicroBatcher(self.run_batch, settings.max_batch,
                                    settings.max_wait_ms / 1000, settings.max_queue,
                                    self.metrics["batch_size"].observe)
        self.metrics["queue_depth"].set_function(lambda: self.batcher.depth)
        self.metrics["ready"].set_function(lambda: float(self.ready))

    def run_batch(self, examples: list) -> list:
        """Runs on the device thread: probabilities with the batch's number and size."""
        self.batches += 1
        probs = self.engine.probabilities(examples)
        return [(p, {"number": self.batches, "size": len(examples)}) for p in probs]


# --- Reading a request ---------------------------------------------------------------------------

async def _read_items(request: Request, settings: Settings) -> list[tuple]:
    """(bytes, text or None, file name or None, name in errors) of every image of a request."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=settings.max_images,
                                      max_fields=settings.max_images + 8)
        except Exception as e:  # noqa: BLE001 -- malformed multipart, too many parts
            detail = getattr(e, "detail", None) or getattr(e, "message", None) or str(e)
            raise InputProblem(400, f"malformed multipart body ({detail})") from None
        files = form.getlist("image")
        if any(isinstance(f, str) for f in files):
            raise InputProblem(422, "image: must be a file part (filename=...), not a text field")
        texts = texts_for(len(files), form.getlist("text") or None, "text")
        items = [(await f.read(), t, f.filename, f"image[{i}]")
                 for i, (f, t) in enumerate(zip(files, texts, strict=True))]
    elif kind == "application/json":
        try:
            obj = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise InputProblem(422, f"the body is not valid JSON ({str(e)[:120]})") from None
        try:
            body = schemas.PredictJSON.model_validate(obj)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise InputProblem(422, f"{where}: {first['msg']}") from None
        names = body.names or [None] * len(body.images)
        if len(names) != len(body.images):
            raise InputProblem(422, f"names: {len(names)} names for {len(body.images)} images")
        texts = texts_for(len(body.images), body.texts)
        items = [(decode_base64(s, f"images[{i}]"), t, n, f"images[{i}]")
                 for i, (s, t, n) in enumerate(zip(body.images, texts, names, strict=True))]
    else:
        raise InputProblem(415, "send multipart/form-data (fields image, text) or "
                                "application/json (images, texts); see /docs")
    if not items:
        raise InputProblem(422, "no image in the request (multipart field 'image', JSON "
                                "'images')")
    if len(items) > settings.max_images:
        raise InputProblem(413, f"{len(items)} images; at most {settings.max_images} a request")
    return items


def _prepare(engine: Engine, item: tuple):
    data, text, name, what = item
    what = f"{what} ({os.path.basename(name)[:80]!r})" if name else what
    image = decode_image(data, what, engine.preprocessing.max_pixels)
    try:
        return engine.example(image, text, name)
    except ValueError as e:
        raise InputProblem(400, f"{what}: {e}") from None


async def _examples(state: _State, request: Request, batched: bool) -> list:
    """The request's preprocessed examples (decoded on the thread pool). With ``batched``, the
    batcher is told they are coming, so a batch may wait for them."""
    if not state.ready:
        raise HTTPException(503, "the model is still compiling; try again in a few seconds",
                            headers={"Retry-After": "5"})
    items = await _read_items(request, state.settings)
    if batched and state.batcher.depth + len(items) > state.settings.max_queue:
        raise QueueFull()
    loop = asyncio.get_running_loop()
    if batched:
        state.batcher.expect(len(items))
    try:
        return await asyncio.gather(*(loop.run_in_executor(state.pool, _prepare, state.engine,
                                                           i) for i in items))
    except BaseException:
        if batched:
            state.batcher.cancel(len(items))
        raise


# --- Answers ------------------------------------------------------------------------------------

def _answer(state: _State, example, probs: np.ndarray) -> dict:
    """What the API says about one example, from its [tower sets, K] probabilities."""
    engine, settings = state.engine, state.settings
    table = lambda p: {n: float(v) for n, v in zip(engine.class_names, p, strict=True)}  # noqa: E731
    sets = dict(zip(engine.tower_sets, probs, strict=True))
    best = int(probs[0].argmax())
    notes = []
    if example.truncated:
        notes.append(f"the text was cut to the model's "
                     f"{engine.preprocessing.max_text_length} tokens, as in training")
    if example.text_source == "none":
        notes.append("no text and no file name were given: the empty text was used")
    if not engine.can_explain:
        notes.append("image-alone and text-alone probabilities need a bundle exported with "
                     "--explain")
    confidence = float(probs[0][best])
    return {"predicted": engine.class_names[best], "confidence": confidence,
            "unsure": confidence < settings.unsure_below, "probabilities": table(probs[0]),
            "image_alone": table(sets["image"]) if len(sets) > 1 and "image" in sets else None,
            "text_alone": table(sets["text"]) if len(sets) > 1 and "text" in sets else None,
            "text": example.text, "text_used": engine.text_used(example),
            "text_source": example.text_source, "text_truncated": example.truncated,
            "notes": notes}


def _header(state: _State) -> dict:
    return {"model_id": state.engine.model_id, "jaxmm_version": __version__,
            "calibrated": state.engine.classifier.temperature != 1.0,
            "unsure_below": state.settings.unsure_below}


def _explanation(state: _State, example, result: dict) -> dict:
    """The explain answer; the overlay PNG is drawn here (on the thread pool)."""
    from jaxmm.evaluation import heatmap

    out = {**_header(state), **_answer(state, example, result["probabilities"]),
           "overlay_png": None, "heatmap": None, "tokens": None, "completeness_gap": None}
    if result["heatmap"] is not None:
        buffer = io.BytesIO()
        heatmap.overlay(example.crop, result["heatmap"]).save(buffer, format="PNG")
        out["overlay_png"] = base64.b64encode(buffer.getvalue()).decode()
        out["heatmap"] = np.round(result["heatmap"], 6).tolist()
    if result["tokens"] is not None:
        out["tokens"] = [{"token": t, "attribution": a} for t, a in result["tokens"]]
        out["completeness_gap"] = result["completeness_gap"]
    return out


# --- The app ------------------------------------------------------------------------------------

def _errors(app: FastAPI) -> None:
    @app.exception_handler(InputProblem)
    async def input_problem(request, error: InputProblem):
        return JSONResponse({"error": error.message}, error.status)

    @app.exception_handler(QueueFull)
    async def queue_full(request, error):
        return JSONResponse({"error": "the server is busy (its queue is full); try again"}, 503,
                            headers={"Retry-After": "1"})

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        return JSONResponse({"error": str(error.detail)}, error.status_code,
                            headers=error.headers)

    @app.exception_handler(Exception)
    async def internal(request, error: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": f"internal error ({type(error).__name__}); the "
                                      "server's log has the details"}, 500)


def create_app(engine: Engine, settings: Settings, on_ready=None) -> FastAPI:
    """The ASGI app serving ``engine`` (warmed up in the background; /readyz says when).

    Args:
      engine: the loaded model.
      settings: limits and options.
      on_ready: called once every batch shape is compiled.
    """
    # Multipart parts stay in memory (the body limit bounds them): the server writes no files.
    MultiPartParser.spool_max_size = settings.max_upload_bytes + 1
    state = _State(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.batcher.start()
        warm = asyncio.create_task(state.batcher.run_alone(engine.warm_up))

        def done(task):
            if not task.cancelled() and task.exception() is None:
                state.ready = True
                if on_ready:
                    on_ready()
            elif not task.cancelled():
                log.error("compiling the model failed: %s", task.exception())

        warm.add_done_callback(done)
        yield
        await asyncio.gather(warm, return_exceptions=True)
        await state.batcher.stop()
        state.pool.shutdown(wait=True)

    app = FastAPI(title="jaxmm", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description=schemas.DESCRIPTION)
    app.state.jaxmm = state
    _errors(app)
    _routes(app, state)
    app.add_middleware(guards.BodyLimit, max_bytes=settings.max_upload_bytes)
    if settings.rate_limit > 0:
        app.add_middleware(guards.RateLimit, per_minute=settings.rate_limit)
    if settings.token:
        app.add_middleware(guards.AccessToken, token=settings.token)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    routes = {r.path for r in app.routes}
    app.add_middleware(guards.Metrics, requests=state.metrics["requests"],
                       latency=state.metrics["latency"], routes=routes)
    return app


def _routes(app: FastAPI, state: _State) -> None:
    engine = state.engine

    @app.post("/v1/predict", summary="Classify images (with texts)",
              responses=schemas.responses(schemas.PredictAnswer),
              openapi_extra=schemas.request_body())
    async def predict(request: Request):
        examples = await _examples(state, request, batched=True)
        results = await asyncio.gather(*(state.batcher.submit(e, expected=True)
                                         for e in examples))
        answers = [{**_answer(state, e, p), "batch": batch}
                   for e, (p, batch) in zip(examples, results, strict=True)]
        return JSONResponse({**_header(state), "predictions": answers})

    @app.post("/v1/explain", summary="Explain one image (Grad-CAM overlay, token attributions)",
              responses=schemas.responses(schemas.ExplainAnswer, 501),
              openapi_extra=schemas.request_body(one=True))
    async def explain(request: Request):
        if not engine.can_explain:
            raise HTTPException(501, HOW_TO_EXPLAIN)
        examples = await _examples(state, request, batched=False)
        if len(examples) != 1:
            raise InputProblem(422, f"explain takes one image, got {len(examples)}")
        if state.explaining.locked():
            raise QueueFull()
        async with state.explaining:
            result = await state.batcher.run_alone(engine.explain, examples[0])
        loop = asyncio.get_running_loop()
        return JSONResponse(await loop.run_in_executor(
            state.pool, _explanation, state, examples[0], result))

    @app.get("/v1/model", summary="What the model is (model.json's description)")
    async def model():
        return JSONResponse(schemas.model_answer(engine, state.settings))

    @app.get("/healthz", summary="Alive")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz", summary="Compiled and ready (503 while compiling)")
    async def readyz():
        if not state.ready:
            return JSONResponse({"status": "compiling"}, 503, headers={"Retry-After": "5"})
        return {"status": "ready", "batch_sizes": engine.sizes}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        return Response(schemas.metrics_text(state.metrics), media_type=schemas.METRICS_TYPE)

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return HTMLResponse(schemas.docs_page(app.openapi()))

    @app.get("/", include_in_schema=False)
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read(), headers={"Cache-Control": "no-cache"})
