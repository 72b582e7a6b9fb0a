"""What the API's bodies look like (the OpenAPI schema and the /docs page are built from these),
the /v1/model answer and the Prometheus metrics."""

import html

from prometheus_client import CONTENT_TYPE_LATEST as METRICS_TYPE  # noqa: F401 -- re-exported
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from jaxmm import __version__

DESCRIPTION = (
    "Classifies photos of rubbish (with a text) into bins with a jaxmm export bundle. Send "
    "`multipart/form-data` (file parts `image`, optional text parts `text`: none, one for all "
    "or one per image; without a text, the upload's file name gives it as in training) or "
    "`application/json` (`images`: base64 strings, optional `texts`, optional `names`). "
    "Errors are `{\"error\": \"one line\"}`: 400 unreadable image, 401 token, 413 too large, "
    "415 not an image or wrong content type, 422 malformed JSON/base64/fields, 429 rate limit, "
    "501 no explanation functions, 503 busy or compiling (with Retry-After).")


class PredictJSON(BaseModel):
    """The JSON form of a predict or explain request."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(min_length=1, description="Images as base64 (PNG, JPEG, WebP, "
                              "...); a data: URL prefix is allowed.")
    texts: list[str] | None = Field(None, description="One text for all images or one per "
                                    "image; default: the file-name rule on `names`.")
    names: list[str] | None = Field(None, description="File names (only their text is used).")


class BatchInfo(BaseModel):
    number: int = Field(description="The device batch this image ran in (counted from 1).")
    size: int = Field(description="Images in that batch (before padding).")


class Prediction(BaseModel):
    predicted: str = Field(description="The bin (class name).")
    confidence: float = Field(description="Its (calibrated) probability.")
    unsure: bool = Field(description="confidence < the server's --unsure_below: ask a person.")
    probabilities: dict[str, float] = Field(description="Per class, both towers (calibrated "
                                            "when the bundle has a temperature).")
    image_alone: dict[str, float] | None = Field(description="With the image tower alone "
                                                 "(bundles exported with --explain).")
    text_alone: dict[str, float] | None = Field(description="With the text tower alone.")
    text: str = Field(description="The text given (or made from the file name).")
    text_used: str = Field(description="The words the model read (after truncation).")
    text_source: str = Field(description="'given', 'file name' or 'none'.")
    text_truncated: bool = Field(description="The text had more tokens than the model reads.")
    notes: list[str]
    batch: BatchInfo


class PredictAnswer(BaseModel):
    model_id: str = Field(description="Derived from the bundle's content digests.")
    jaxmm_version: str
    calibrated: bool
    unsure_below: float
    predictions: list[Prediction]


class TokenAttribution(BaseModel):
    token: str
    attribution: float = Field(description="Integrated gradients (positive: for the class).")


class ExplainAnswer(BaseModel):
    model_id: str
    jaxmm_version: str
    predicted: str
    confidence: float
    probabilities: dict[str, float]
    image_alone: dict[str, float] | None
    text_alone: dict[str, float] | None
    text_used: str
    overlay_png: str | None = Field(description="Base64 PNG: the model's view of the photo "
                                    "with the Grad-CAM map of the predicted class over it.")
    heatmap: list[list[float]] | None = Field(description="The Grad-CAM map, in [0, 1].")
    tokens: list[TokenAttribution] | None
    completeness_gap: float | None


class ErrorAnswer(BaseModel):
    error: str


def responses(model, *extra) -> dict:
    out = {200: {"model": model}}
    for status in (400, 413, 415, 422, 503, *extra):
        out[status] = {"model": ErrorAnswer}
    return out


def request_body(one: bool = False) -> dict:
    """The two forms of the request body, for the OpenAPI schema."""
    many = "One image." if one else "One or more images (repeat the part)."
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["image"], "properties": {
                "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                          "description": many},
                "text": {"type": "array", "items": {"type": "string"},
                         "description": "None, one for all or one per image."}}}},
        "application/json": {"schema": PredictJSON.model_json_schema()}}}}


def model_answer(engine, settings) -> dict:
    """GET /v1/model: what model.json says, and how this server runs it."""
    record = engine.record
    model = record["model"]
    return {"model_id": engine.model_id, "class_names": engine.class_names,
            "preprocessing": model["preprocessing"], "calibration": model.get("calibration"),
            "modalities": model["architecture"]["modalities"], "versions": record.get("versions"),
            "created": record.get("created"), "explain": engine.can_explain,
            "tower_sets": engine.tower_sets, "jaxmm_version": __version__,
            "server": {"max_batch": settings.max_batch, "batch_sizes": engine.sizes,
                       "max_wait_ms": settings.max_wait_ms, "unsure_below": settings.unsure_below,
                       "max_upload_bytes": settings.max_upload_bytes,
                       "max_images": settings.max_images}}


def metrics(batch_sizes) -> dict:
    """The server's Prometheus metrics, in a registry of their own."""
    registry = CollectorRegistry()
    return {
        "registry": registry,
        "requests": Counter("jaxmm_requests", "HTTP requests by route and status",
                            ["route", "status"], registry=registry),
        "latency": Histogram("jaxmm_request_seconds", "Time to answer, by route", ["route"],
                             registry=registry,
                             buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)),
        "batch_size": Histogram("jaxmm_batch_size", "Images per device batch (before padding)",
                                registry=registry, buckets=tuple(batch_sizes)),
        "queue_depth": Gauge("jaxmm_queue_depth", "Images waiting for a device batch",
                             registry=registry),
        "ready": Gauge("jaxmm_ready", "1 once every batch shape is compiled",
                       registry=registry),
    }


def metrics_text(m: dict) -> bytes:
    return generate_latest(m["registry"])


def docs_page(schema: dict) -> str:
    """The OpenAPI schema as one self-contained HTML page (no scripts, no external assets)."""
    e = html.escape
    parts = [f"<h1>{e(schema['info']['title'])} {e(schema['info']['version'])} API</h1>",
             f"<p>{e(schema['info'].get('description', ''))}</p>",
             '<p>The machine-readable schema: <a href="/openapi.json">/openapi.json</a>.</p>']
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            parts.append(f"<h2><code>{method.upper()} {e(path)}</code></h2>"
                         f"<p>{e(op.get('summary', ''))}</p>")
            for kind, body in op.get("requestBody", {}).get("content", {}).items():
                props = body["schema"].get("properties", {})
                rows = "".join(f"<li><code>{e(k)}</code>: {e(v.get('description', ''))}</li>"
                               for k, v in props.items())
                parts.append(f"<p>Body <code>{e(kind)}</code>:</p><ul>{rows}</ul>")
            codes = ", ".join(e(c) for c in op.get("responses", {}))
            parts.append(f"<p>Answers: {codes}</p>")
    style = ("body{font:16px/1.5 system-ui,sans-serif;max-width:52rem;margin:2rem auto;"
             "padding:0 1rem;color:#111}code{background:#f1f1f1;padding:0 .2em}")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>jaxmm API'
            f'</title><meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<style>{style}</style></head><body><main>{''.join(parts)}</main></body></html>")
