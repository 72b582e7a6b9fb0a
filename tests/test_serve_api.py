"""The HTTP API of ``python -m jaxmm.serve`` against a real server on a loopback port: the
numbers of ``Classifier.predict``, requests released together answered as one batch and each
routed back, every bad input refused with one line, the limits, metrics, no files written,
no training package imported, and a graceful exit 0 on SIGTERM."""

import base64
import http.client
import json
import os
import socket
import threading
import urllib.parse

import httpx
import numpy as np
import pytest

from tests import support

BATCH = 8  # the shared server's --max_batch


@pytest.fixture(scope="module")
def classifier(explain_bundle_dir):
    from jaxmm.trained.classifier import Classifier

    return Classifier.load(explain_bundle_dir, batch_size=BATCH)


@pytest.fixture(scope="module")
def photos(test_split):
    """Eight (file name, bytes, text) of the test split, texts all different."""
    files, texts, _ = test_split
    out = []
    for i, path in enumerate(files[:BATCH]):
        with open(path, "rb") as f:
            out.append((os.path.basename(path), f.read(), f"{texts[i]} {i}"))
    return out


def _post(url, files=None, data=None, json_body=None, timeout=120, **kw):
    return httpx.post(url, files=files, data=data, json=json_body, timeout=timeout, **kw)


def _check_answer(answer, classifier, path_or_image, text):
    want = classifier.predict([path_or_image], [text]).probs[0]
    got = np.array([answer["probabilities"][c] for c in classifier.class_names])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert answer["predicted"] == classifier.class_names[int(want.argmax())]


def test_predict_multipart_equals_the_classifier(server, classifier, photos, test_split):
    files = [("image", (name, data, "image/png")) for name, data, _ in photos]
    r = _post(server.url + "/v1/predict", files=files,
              data={"text": [t for _, _, t in photos]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == classifier.model_id and body["jaxmm_version"]
    assert body["calibrated"] is (classifier.temperature != 1.0)
    paths = test_split[0][:BATCH]
    for path, (_, _, text), answer in zip(paths, photos, body["predictions"], strict=True):
        _check_answer(answer, classifier, path, text)
        assert answer["text"] == text and answer["text_source"] == "given"
        assert set(answer["image_alone"]) == set(classifier.class_names)
        assert abs(sum(answer["text_alone"].values()) - 1) < 1e-5
        assert answer["unsure"] is (answer["confidence"] < 0.6)
        assert answer["batch"]["size"] == BATCH  # eight images fill one batch at once


def test_predict_json_base64_and_the_file_name_rule(server, classifier, photos, test_split):
    images = [base64.b64encode(data).decode() for _, data, _ in photos]
    images[1] = "data:image/png;base64," + images[1]
    names = [name for name, _, _ in photos]
    r = _post(server.url + "/v1/predict", json_body={"images": images, "names": names})
    assert r.status_code == 200, r.text
    for path, answer in zip(test_split[0][:BATCH], r.json()["predictions"], strict=True):
        text = classifier.spec.preprocessing.text_of(path)
        assert answer["text"] == text and answer["text_source"] == "file name"
        _check_answer(answer, classifier, path, text)


def test_requests_released_together_arrive_as_one_batch(server, classifier, photos,
                                                        test_split):
    """Eight clients wait at a barrier, then each posts its own photo and text: the server
    must answer them from one device batch, each with its own numbers."""
    host, port = urllib.parse.urlsplit(server.url).netloc.split(":")
    barrier, answers = threading.Barrier(BATCH), [None] * BATCH

    def client(i):
        name, data, text = photos[i]
        body, ctype = _multipart([("image", name, data), ("text", None, text.encode())])
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        conn.connect()
        barrier.wait()
        conn.request("POST", "/v1/predict", body, {"Content-Type": ctype})
        response = conn.getresponse()
        answers[i] = (response.status, json.loads(response.read()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(BATCH)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(status == 200 for status, _ in answers), answers
    batches = {a["predictions"][0]["batch"]["number"] for _, a in answers}
    assert len(batches) == 1 and answers[0][1]["predictions"][0]["batch"]["size"] == BATCH
    for i, (_, body) in enumerate(answers):
        answer = body["predictions"][0]
        assert answer["text"] == photos[i][2]
        _check_answer(answer, classifier, test_split[0][i], photos[i][2])


def _multipart(parts):
    boundary = "jaxmmtestboundary"
    body = b""
    for field, filename, data in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"'
                                                       if filename else "")
        body += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n").encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_long_text_is_truncated_and_said(server, photos):
    name, data, _ = photos[0]
    long_text = " ".join(["plastic bottle"] * 40)
    r = _post(server.url + "/v1/explain", files={"image": (name, data)},
              data={"text": long_text})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["text_truncated"] is True
    assert any("cut to the model's 16 tokens" in n for n in answer["notes"])
    assert answer["text_used"].startswith("plastic bottle")
    assert len(answer["text_used"].split()) == 14  # 16 tokens: [CLS], 14 words, [SEP]


def test_explain_gives_overlay_and_token_attributions(server, classifier, photos, test_split):
    from PIL import Image

    name, data, text = photos[2]
    r = _post(server.url + "/v1/explain", files={"image": (name, data)}, data={"text": text})
    assert r.status_code == 200, r.text
    answer = r.json()
    _check_answer(answer, classifier, test_split[0][2], text)
    import io

    overlay = Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"])))
    assert overlay.format == "PNG" and min(overlay.size) >= 224
    heat = np.array(answer["heatmap"])
    assert heat.ndim == 2 and 0 <= heat.min() and heat.max() <= 1
    tokens = [t["token"] for t in answer["tokens"]]
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert answer["completeness_gap"] < 0.05
    many = _post(server.url + "/v1/explain", files=[("image", (n, d)) for n, d, _ in photos[:2]])
    assert many.status_code == 422 and "one image" in many.json()["error"]


def _bomb() -> bytes:
    """A real PNG of 12000 x 12000 one-bit pixels (144 million) in a few kilobytes."""
    import struct
    import zlib

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    side = 12000
    raw = zlib.compress(b"\0" * ((side // 8 + 1) * side), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0,
                                                              0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def _zero_pixels() -> bytes:
    good = support.png_bytes(np.zeros((4, 4, 3)))
    return good[:16] + (0).to_bytes(4, "big") + good[20:]  # IHDR width 0


@pytest.mark.parametrize("case,status,words", [
    ("not an image", 415, "not an image"),
    ("truncated", 400, "truncated or corrupt"),
    ("bomb", 400, "more than"),
    ("zero pixels", 400, "zero pixels (0x4)"),
    ("empty", 400, "empty file"),
])
def test_bad_images_are_refused_in_one_line(server, photos, case, status, words):
    good = photos[0][1]
    data = {"not an image": b"hello, I am text", "truncated": good[:len(good) // 2],
            "bomb": _bomb(), "zero pixels": _zero_pixels(), "empty": b""}[case]
    r = _post(server.url + "/v1/predict", files={"image": ("x.png", data, "image/png")})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error and "\n" not in error and "image[0]" in error


@pytest.mark.parametrize("body,ctype,status,words", [
    (b'{"images": ["AAAA"', "application/json", 422, "not valid JSON"),
    (b'{"images": ["not base64!!"]}', "application/json", 422, "images[0]: not valid base64"),
    (b'{"images": []}', "application/json", 422, "images"),
    (b'{"images": ["AAAA"], "texts": [1]}', "application/json", 422, "texts.0"),
    (b'{"images": ["AAAA"], "colour": "red"}', "application/json", 422, "colour"),
    (b"image=abc", "application/x-www-form-urlencoded", 415, "multipart/form-data"),
    (b"--x\r\nbroken", "multipart/form-data; boundary=x", 422, "no image"),
])
def test_malformed_requests_are_refused(server, body, ctype, status, words):
    r = httpx.post(server.url + "/v1/predict", content=body, headers={"Content-Type": ctype},
                   timeout=60)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_too_many_images_and_wrong_text_count(server, photos):
    name, data, _ = photos[0]
    r = _post(server.url + "/v1/predict", files=[("image", (name, data))] * 17)
    assert r.status_code in (400, 413), r.text  # the multipart parser or the image count
    r = _post(server.url + "/v1/predict", files=[("image", (name, data))] * 2,
              data={"text": ["a", "b", "c"]})
    assert r.status_code == 422 and "3 texts for 2 images" in r.json()["error"]


def _raw(server, head: bytes, body_parts=()) -> bytes:
    host, port = urllib.parse.urlsplit(server.url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        sock.shutdown(socket.SHUT_WR) if not body_parts else None
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            more = sock.recv(65536)
            if not more:
                break
            data += more
    return data


def test_oversized_upload_is_refused_before_it_is_read(server):
    """Declared too large: 413 with no byte of the body sent. Chunked: 413 once the chunks
    pass the limit, though the body never ends."""
    declared = _raw(server, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
                            b"multipart/form-data; boundary=b\r\nContent-Length: 3000000\r\n\r\n")
    assert declared.startswith(b"HTTP/1.1 413") and b"2,097,152 bytes" in declared
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b"a" * (1 << 20))
    chunked = _raw(server, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
                           b"multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n",
                   [chunk, chunk, chunk])
    assert chunked.startswith(b"HTTP/1.1 413")


def test_full_queue_answers_503_with_retry_after(server, photos):
    """Seven images wait for an eighth (5 s); two more do not fit a queue of 8."""
    name, data, _ = photos[0]
    waiting = {}
    thread = threading.Thread(target=lambda: waiting.update(r=_post(
        server.url + "/v1/predict", files=[("image", (name, data))] * 7)))
    thread.start()
    try:
        for _ in range(600):
            metrics = httpx.get(server.url + "/metrics", timeout=30).text
            if "jaxmm_queue_depth 7.0" in metrics:
                break
            threading.Event().wait(0.01)
        r = _post(server.url + "/v1/predict", files=[("image", (name, data))] * 2)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
    finally:
        thread.join()
    assert waiting["r"].status_code == 200
    assert waiting["r"].json()["predictions"][0]["batch"]["size"] == 7


def test_model_health_metrics_docs_and_cors(server, classifier):
    model = httpx.get(server.url + "/v1/model").json()
    assert model["class_names"] == classifier.class_names and model["explain"] is True
    assert model["preprocessing"]["crop_size"] == 32 and model["model_id"] == classifier.model_id
    assert model["server"]["batch_sizes"] == [1, 2, 4, 8]
    assert httpx.get(server.url + "/healthz").json() == {"status": "alive"}
    assert httpx.get(server.url + "/readyz").json()["status"] == "ready"
    metrics = httpx.get(server.url + "/metrics").text
    assert 'jaxmm_requests_total{route="/v1/predict",status="200"}' in metrics
    assert "jaxmm_batch_size_bucket" in metrics and "jaxmm_queue_depth" in metrics
    assert 'jaxmm_request_seconds_count{route="/v1/predict"}' in metrics
    schema = httpx.get(server.url + "/openapi.json").json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert "images" in body["application/json"]["schema"]["properties"]
    docs = httpx.get(server.url + "/docs").text
    assert "/v1/explain" in docs and "<script" not in docs and "http" not in docs.split(
        "/openapi.json")[0].split("<body>")[1]
    r = httpx.get(server.url + "/v1/model", headers={"Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in r.headers  # CORS closed by default


def test_the_server_wrote_no_files(server, photos):
    """A 1.5 MB upload (which Starlette would spool to disk beyond 1 MB) leaves the server's
    temporary and working folders empty."""
    noise = np.random.default_rng(0).integers(0, 256, (720, 720, 3))
    big = support.png_bytes(noise)
    assert 1 << 20 < len(big) < 2 << 20
    r = _post(server.url + "/v1/predict", files=[("image", ("noise.png", big))] * 1,
              data={"text": "noise"})
    assert r.status_code == 200, r.text
    assert os.listdir(server.root / "tmp") == [] and os.listdir(server.root / "cwd") == []


def test_guards_token_and_rate_limit():
    """The access token and the per-client rate limit, on an app called in-process from a
    client address that is not loopback (the real server does not limit loopback clients)."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from jaxmm.serving import guards

    async def ok(request):
        return JSONResponse({"ok": True})

    inner = Starlette(routes=[Route("/v1/predict", ok, methods=["POST"]), Route("/", ok)])
    app = guards.AccessToken(guards.RateLimit(inner, per_minute=3), "s3cret")
    auth = {"Authorization": "Bearer s3cret"}

    async def requests():
        transport = httpx.ASGITransport(app=app, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://jaxmm") as client:
            out = [(await client.post("/v1/predict")).status_code,
                   (await client.get("/")).status_code]  # the page stays open
            for _ in range(5):
                r = await client.post("/v1/predict", headers=auth)
                out.append((r.status_code, r.headers.get("retry-after")))
            return out

    got = asyncio.run(requests())
    assert got[:2] == [401, 200]
    assert [s for s, _ in got[2:]] == [200, 200, 200, 429, 429]
    assert int(got[-1][1]) >= 1


def test_plain_bundle_sigterm_and_no_training_imports(bundle_dir, photos, tmp_path):
    """A bundle exported without --explain serves predictions and says how to get
    explanations; SIGTERM lets the request in flight finish and the process exit 0; the
    process never imported flax or a training package."""
    srv = support.Server(bundle_dir, "--max_batch", "4", "--max_wait_ms", "3000",
                         environ=dict(support.env(1), TMPDIR=str(tmp_path)))
    try:
        name, data, _ = photos[0]
        r = _post(srv.url + "/v1/explain", files={"image": (name, data)})
        assert r.status_code == 501 and "python -m jaxmm.export" in r.json()["error"]
        assert "--explain" in r.json()["error"]
        in_flight = {}
        thread = threading.Thread(target=lambda: in_flight.update(r=_post(
            srv.url + "/v1/predict", files={"image": (name, data)})))
        thread.start()
        for _ in range(600):
            if "jaxmm_queue_depth 1.0" in httpx.get(srv.url + "/metrics").text:
                break
            threading.Event().wait(0.01)
        srv.proc.terminate()  # SIGTERM while the request waits for its batch
        thread.join()
        assert srv.proc.wait(60) == 0, "\n".join(srv.lines[-20:])
    finally:
        srv.stop()
    answer = in_flight["r"].json()["predictions"][0]
    assert in_flight["r"].status_code == 200
    assert answer["image_alone"] is None and "--explain" in answer["notes"][-1]
    assert any(line.startswith("stopped by SIGTERM") for line in srv.lines)
    assert srv.imported() == []
