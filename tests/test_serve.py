"""``sdclip serve``: every answer equals the in-process API; limits, errors, auth, CORS, overload, SIGTERM."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors
from serving import free_port, wait_ready

import sdclip
from sdclip.prompts import chunk
from sdclip.prompts.render import to_json
from sdclip.serve import Limits, ServeConfig, create_app
from sdclip.serve import work as work_module

PROMPTS = [
    "a (red:1.2) star above a [blue] square",
    "a photo of a cat",
    "masterpiece, " * 30 + "a dog BREAK a cat",
    "a (fluffy)1.2 cat++ on a mat-",
    "",
]


AFFINITY = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="CPU affinity and /proc: Linux")


@pytest.fixture(scope="module")
def te():
    return sdclip.load()


def _ready(client: TestClient) -> TestClient:
    deadline = time.monotonic() + 30
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.02)
    return client


@pytest.fixture(scope="module")
def client(te):
    app = create_app(
        ServeConfig(
            models={"mini": te, "other": te},
            max_wait_ms=20,
            limits=Limits(max_prompts=8, max_chars=500, max_tokens=300, max_body_bytes=20000),
        )
    )
    with TestClient(app) as c:
        yield _ready(c)


def _tensor(obj: dict) -> torch.Tensor:
    dtype = getattr(torch, obj["dtype"])
    return torch.frombuffer(bytearray(base64.b64decode(obj["data"])), dtype=dtype).view(obj["shape"])


def _error(response, status: int, kind: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if kind is not None:
        assert error["type"] == kind, error
    return error


# --- answers equal the library ------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["a1111", "comfy", "compel", "diffusers"])
def test_encode_equals_encode_prompts(client, te, dialect):
    prompts = PROMPTS if dialect == "compel" else PROMPTS[:3] + PROMPTS[4:]
    negatives = ["blurry", None, "ugly, (bad:1.3) hands", "x", "low quality"][: len(prompts)]
    for negative in ("blurry", negatives, None):
        body = {"prompts": prompts, "negative": negative, "dialect": dialect, "clip_skip": None}
        got = client.post("/v1/encode", json=body).json()["tensors"]
        ref = sdclip.encode_prompts(te, prompts, negative, dialect=dialect, cache=None)
        assert torch.equal(_tensor(got["hidden"]), ref.hidden)
        assert torch.equal(_tensor(got["negative_hidden"]), ref.negative_hidden)
        assert ("pooled" in got) == (ref.pooled is not None)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_encode_safetensors_options_and_dtype(client, te, dtype):
    """The safetensors body in each dtype (numpy's writer, or torch's for bfloat16) with its metadata."""
    body = {
        "prompts": ["a [red:blue:5] star", "a cat"],
        "negative": "blurry",
        "dialect": "a1111",
        "clip_skip": 2,
        "step": 7,
        "steps": 10,
        "emphasis": "no-norm",
        "dtype": dtype,
    }
    r = client.post("/v1/encode", json=body, headers={"Accept": "application/octet-stream"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    got = load_safetensors(r.content)
    ref = sdclip.encode_prompts(
        te, body["prompts"], "blurry", dialect="a1111", clip_skip=2, step=7, steps=10, emphasis="no-norm", cache=None
    )
    want = getattr(torch, dtype)
    fields = {"hidden": ref.hidden, "pooled": ref.pooled, "negative_hidden": ref.negative_hidden}
    assert set(got) == {k for k, v in {**fields, "negative_pooled": ref.negative_pooled}.items() if v is not None}
    assert all(t.dtype == want for t in got.values())
    assert all(torch.equal(got[k], v.to(want)) for k, v in fields.items() if v is not None)
    n = int.from_bytes(r.content[:8], "little")
    assert json.loads(r.content[8 : 8 + n])["__metadata__"] == {
        "model": "mini",
        "family": te.family,
        "dialect": "a1111",
    }


def test_raw_encode_equals_text_encoder(client, te):
    got = client.post("/v1/encode", json={"prompts": PROMPTS, "dialect": None, "layer": -2, "final_norm": True}).json()
    ref = te.encode(PROMPTS, layer=-2, final_norm=True)
    for name in ("hidden", "pooled", "pooled_projected"):
        assert torch.equal(_tensor(got["tensors"][name]), getattr(ref, name))


def test_concurrent_requests_are_batched_and_exact(client, te):
    """Requests arriving together share micro-batches; each answer is still its own encode_prompts."""
    before = _batches(client)
    cases = [
        ([f"a {c} {s}", "a (big:1.1) house"], "blurry" if i % 2 else None)
        for i, (c, s) in enumerate((c, s) for c in ("red", "blue", "green") for s in ("star", "cross", "ring"))
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(
            pool.map(
                lambda case: client.post(
                    "/v1/encode", json={"prompts": case[0], "negative": case[1], "dialect": "comfy"}
                ).json(),
                cases,
            )
        )
    for (prompts, negative), got in zip(cases, answers):
        ref = sdclip.encode_prompts(te, prompts, negative, dialect="comfy", cache=None)
        assert torch.equal(_tensor(got["tensors"]["hidden"]), ref.hidden)
        assert torch.equal(_tensor(got["tensors"]["negative_hidden"]), ref.negative_hidden)
    count, prompts = (a - b for a, b in zip(_batches(client), before))
    assert count < len(cases) and prompts == 2 * len(cases)  # fewer batches than requests


def test_concurrent_raw_and_embeddings_requests_are_batched_and_exact(client, te):
    """Raw hidden states and embeddings of requests arriving together share one engine call; each answer is bit for
    bit the request's own TextEncoder.encode, run one at a time."""
    before = _batches(client)
    inputs = [[f"a {c} {s}", "a big house, " * (1 + len(c + s) % 9)] for c in ("red", "blue", "green") for s in SHAPES]
    inputs[0] = inputs[0][:1]
    inputs[1] = inputs[1] + ["a, " * 40]  # longer than one chunk: truncated

    def send(i: int) -> dict:
        if i % 2:
            return client.post("/v1/embeddings", json={"input": inputs[i], "encoding_format": "base64"}).json()
        body = {"prompts": inputs[i], "dialect": None, "layer": -2 if i % 4 else None}
        return client.post("/v1/encode", json=body).json()

    with ThreadPoolExecutor(len(inputs)) as pool:
        answers = list(pool.map(send, range(len(inputs))))
    for i, got in enumerate(answers):
        if i % 2:
            ref = te.encode(inputs[i], hidden=False).pooled_projected
            vectors = [base64.b64decode(d["embedding"]) for d in got["data"]]
            assert torch.equal(torch.frombuffer(bytearray(b"".join(vectors)), dtype=torch.float32).view(ref.shape), ref)
        else:
            ref = te.encode(inputs[i], layer=-2 if i % 4 else None)
            for name in ("hidden", "pooled", "pooled_projected"):
                assert torch.equal(_tensor(got["tensors"][name]), getattr(ref, name)), (i, name)
    count, prompts = (a - b for a, b in zip(_batches(client), before))
    assert count < len(inputs) and prompts == sum(map(len, inputs))  # fewer batches than requests


SHAPES = ("star", "cross", "ring")


def _batches(client) -> tuple[float, float]:
    text = client.get("/metrics").text
    count = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("sdclip_batch_prompts_count"))
    total = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("sdclip_batch_prompts_sum"))
    return count, total


def test_embeddings_openai_shape(client, te):
    r = client.post("/v1/embeddings", json={"input": ["a red star", "a blue square"], "model": "mini", "user": "x"})
    data = r.json()
    ref = te.encode(["a red star", "a blue square"], hidden=False).pooled_projected
    assert data["object"] == "list" and data["model"] == "mini"
    assert [d["index"] for d in data["data"]] == [0, 1]
    assert torch.equal(torch.tensor([d["embedding"] for d in data["data"]]), ref)
    assert data["usage"] == {"prompt_tokens": 10, "total_tokens": 10}
    one = client.post(
        "/v1/embeddings", json={"input": "a red star", "normalize": True, "encoding_format": "base64"}
    ).json()["data"][0]["embedding"]
    vector = torch.frombuffer(bytearray(base64.b64decode(one)), dtype=torch.float32)
    alone = te.encode(["a red star"], hidden=False).pooled_projected
    assert torch.equal(vector, torch.nn.functional.normalize(alone, dim=-1)[0])


def test_tokenize_matches_tokenizer_and_chunker(client, te):
    prompt = "masterpiece, " * 30 + "a (red:1.3) star BREAK a [blue] cat"
    data = client.post("/v1/tokenize", json={"prompt": prompt, "dialect": "a1111"}).json()
    tok = te.tokenizers[0]
    assert data["ids"] == tok.encode(prompt)
    assert [(t["id"], t["start"], t["end"]) for t in data["tokens"]] == [
        (t.id, t.start, t.end) for t in tok.tokens(prompt)
    ]
    ref = chunk(prompt, "a1111", tok, pad_id=te.towers[0].config.pad_id)
    assert [c["ids"] for c in data["chunks"]["chunks"]] == [list(r) for r in ref.ids]
    assert [c["weights"] for c in data["chunks"]["chunks"]] == [list(r) for r in ref.weights]
    assert data["chunks"]["token_count"] == ref.token_count
    red = [t for c in data["chunks"]["chunks"] for t in c["tokens"] if t["text"] == "red "]
    assert red and red[0]["weight"] == pytest.approx(1.3)
    # prompt editing: the A1111 schedule
    sched = client.post("/v1/tokenize", json={"prompt": "a [cat:dog:5] photo", "dialect": "a1111", "steps": 10}).json()
    ref = to_json(chunk("a [cat:dog:5] photo", "a1111", tok, steps=10))
    assert [e["until_step"] for e in sched["chunks"]["schedule"]] == [e["until_step"] for e in ref["schedule"]]
    assert len(ref["schedule"]) == 2 and sched["chunks"]["steps"] == 10
    # truncation shown
    long = client.post("/v1/tokenize", json={"prompt": "word " * 90, "dialect": "diffusers"}).json()["chunks"]
    assert long["truncated_tokens"] == 15 and long["truncated"].strip() == " ".join(["word"] * 15)


def test_compare_cosine_per_layer(client, te):
    data = client.post("/v1/compare", json={"a": "a red star", "b": "a blue star"}).json()
    assert data["layers"] == [0, 1, 2] and data["positions"] == 5
    for layer, row in zip(data["layers"], data["cosine"]):
        h = te.encode(["a red star", "a blue star"], layer=layer, final_norm=False).hidden[:, :5]
        assert row == pytest.approx(torch.nn.functional.cosine_similarity(h[0], h[1], dim=-1).tolist(), abs=1e-6)
    assert data["cosine"][0][:2] == [1.0, 1.0] and data["cosine"][0][2] < 0.5  # BOS, "a" equal; red vs blue not


# --- bad requests: 4xx with a JSON error, never 500, the worker keeps going ------------------------------------


def test_bad_requests_are_4xx(client):
    post = lambda body, **kw: client.post("/v1/encode", json=body, **kw)
    _error(
        client.post("/v1/encode", content=b'{"prompts": ["a"', headers={"Content-Type": "application/json"}),
        422,
        "malformed_json",
    )
    _error(
        client.post(
            "/v1/encode", content=b'{"prompts": "a", "clip_skip": NaN}', headers={"Content-Type": "application/json"}
        ),
        422,
    )
    _error(
        client.post(
            "/v1/encode", content=b'{"prompts": "a", "clip_skip": 1e999}', headers={"Content-Type": "application/json"}
        ),
        422,
    )
    _error(post({"prompts": "a", "dialect": "nope"}), 422, "bad_input")
    _error(post({"prompts": "a", "model": "nope"}), 404, "unknown_model")
    _error(post({"prompts": "a", "bogus": 1}), 422)
    _error(post({"prompts": 5}), 422)
    _error(post({"prompts": []}), 422)
    _error(post({"prompts": ["a", "b"], "negative": ["x"], "dialect": "a1111"}), 422, "bad_input")
    _error(post({"prompts": "a", "dialect": None, "layer": 7}), 422, "bad_input")
    _error(post({"prompts": "a", "dialect": "a1111", "layer": -2}), 422, "bad_input")
    _error(post({"prompts": "a AND b", "dialect": "a1111"}), 422, "bad_input")  # composable diffusion
    _error(post({"prompts": "a", "embeddings": ["nothing"], "dialect": "a1111"}), 422, "unknown_embedding")
    _error(client.post("/v1/embeddings", json={"input": [[1, 2, 3]]}), 422)
    _error(client.post("/v1/tokenize", json={"prompt": "a", "dialect": "comfy", "steps": 5}), 422, "bad_input")
    for weird in (
        "(cat:nan)",
        "(cat:inf)",
        "(cat)nan",
        "(cat)1e999",
        "(cat:1e38)",
        "cat+" * 50,
        "(((((((((x" * 5,
        "\x00\ufffe\U0010ffff",
    ):
        for dialect in ("a1111", "comfy", "compel"):
            r = post({"prompts": weird, "dialect": dialect})
            assert r.status_code in (200, 413, 422), (weird, dialect, r.text)
            if r.status_code == 200:
                assert torch.isfinite(_tensor(r.json()["tensors"]["hidden"])).all(), (weird, dialect)
    for path, body in (
        ("/v1/tokenize", b'{"prompt": "a \\ud800 cat", "dialect": "compel"}'),
        ("/v1/encode", b'{"prompts": "a \\udfff", "dialect": "a1111"}'),
        ("/v1/embeddings", b'{"input": ["\\ud800"]}'),
    ):  # lone surrogates: valid JSON, no text
        _error(client.post(path, content=body, headers={"Content-Type": "application/json"}), 422, "bad_input")
    for huge in ("(a:1e308)", "(a:1e38)"):  # a conditioning with inf or NaN would be refused (non_finite)
        r = post({"prompts": huge, "dialect": "a1111", "dtype": "float16"})
        assert r.status_code == 422 or torch.isfinite(_tensor(r.json()["tensors"]["hidden"])).all()
    # finite in float32 (|x| ~5e5), beyond float16's 65504: the float16 answer would hold inf
    assert post({"prompts": "a (x:1e6) cat", "dialect": "comfy"}).status_code == 200
    r = _error(post({"prompts": "a (x:1e6) cat", "dialect": "comfy", "dtype": "float16"}), 422, "non_finite")
    assert "float16" in r["message"]
    assert post({"prompts": "still alive", "dialect": "a1111"}).status_code == 200


def test_limits_name_the_limit(client):
    checks = [
        ({"prompts": ["a"] * 9}, "max_prompts", 8),
        ({"prompts": "a" * 501}, "max_chars", 500),
        ({"prompts": "a", "negative": "n" * 501, "dialect": "a1111"}, "max_chars", 500),
        ({"prompts": "a," * 240, "dialect": "a1111"}, "max_tokens", 300),
        ({"prompts": "BREAK " * 10, "dialect": "a1111"}, "max_tokens", 300),  # 75 per chunk
        ({"prompts": "a," * 240, "dialect": None}, "max_tokens", 300),
    ]
    for body, limit, value in checks:
        error = _error(client.post("/v1/encode", json=body), 413, "limit_exceeded")
        assert (error["limit"], error["value"]) == (limit, value) and limit in error["message"]
    error = _error(client.post("/v1/embeddings", json={"input": ["a"] * 9}), 413)
    assert error["limit"] == "max_prompts"
    big = json.dumps({"prompts": ["a" * 400] * 60}).encode()
    error = _error(client.post("/v1/encode", content=big, headers={"Content-Type": "application/json"}), 413)
    assert (error["limit"], error["value"]) == ("max_body_bytes", 20000)
    chunked = client.post(
        "/v1/encode", content=iter([big[:10000], big[10000:]]), headers={"Content-Type": "application/json"}
    )  # no Content-Length
    assert _error(chunked, 413)["limit"] == "max_body_bytes"


def test_queue_full_is_503_with_retry_after(te, monkeypatch):
    gate = threading.Event()
    monkeypatch.setattr(work_module, "compare_layers", lambda *a: gate.wait(30) and {"held": True})
    app = create_app(ServeConfig(models={"mini": te}, queue_size=2, max_batch=1, max_wait_ms=0, model_process=False))
    with TestClient(app) as c, ThreadPoolExecutor(4) as pool:
        _ready(c)
        held = pool.submit(c.post, "/v1/compare", json={"a": "a", "b": "b"})
        deadline = time.monotonic() + 10
        while "sdclip_queue_depth{model=\"mini\"} 0" not in c.get("/metrics").text or held.done():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.05)  # the worker holds the compare job; the queue is empty
        waiting = [pool.submit(c.post, "/v1/encode", json={"prompts": f"p{i}"}) for i in range(2)]
        while 'sdclip_queue_depth{model="mini"} 2' not in c.get("/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = c.post("/v1/encode", json={"prompts": "one too many"})
        error = _error(r, 503, "overloaded")
        assert r.headers["Retry-After"] == "1" and (error["limit"], error["value"]) == ("queue_size", 2)
        gate.set()
        assert held.result().json() == {"held": True}
        assert [w.result().status_code for w in waiting] == [200, 200]
        assert c.post("/v1/encode", json={"prompts": "recovered"}).status_code == 200


def test_a_disconnected_clients_job_is_dropped_before_it_runs(te, monkeypatch):
    """A request whose client hangs up while it waits in the queue is cancelled: never encoded, counted as 499."""
    import socket

    import uvicorn

    gate = threading.Event()
    monkeypatch.setattr(work_module, "compare_layers", lambda *a: gate.wait(30) and {"held": True})
    app = create_app(ServeConfig(models={"mini": te}, max_batch=1, max_wait_ms=0, model_process=False))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, 60)
        metrics = lambda: urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        rows = te.reuse.stats.rows
        assert _post(base + "/v1/encode", {"prompts": ["control"], "dialect": "a1111"})[0] == 200
        per_request = te.reuse.stats.rows - rows  # what one such request costs the encoder
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(_post, base + "/v1/compare", {"a": "a", "b": "b"})  # the worker is busy with it
            deadline = time.monotonic() + 20
            while 'sdclip_queue_depth{model="mini"} 0' not in metrics() or held.done():
                assert time.monotonic() < deadline
                time.sleep(0.02)
            body = json.dumps({"prompts": ["never encoded"], "dialect": "a1111"}).encode()
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(
                    b"POST /v1/encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                while 'sdclip_queue_depth{model="mini"} 1' not in metrics():
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            while 'route="/v1/encode",status="499"} 1' not in metrics():  # the hang-up is noticed at once
                assert time.monotonic() < deadline
                time.sleep(0.02)
            rows = te.reuse.stats.rows
            gate.set()
            assert held.result()[0] == 200
            assert _post(base + "/v1/encode", {"prompts": ["after"], "dialect": "a1111"})[0] == 200
        assert te.reuse.stats.rows == rows + per_request  # "after" alone reached the encoder
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)


# --- auth, CORS, docs, metrics, models ---------------------------------------------------------------------


def test_token_auth_and_cors(te):
    app = create_app(ServeConfig(models={"mini": te}, token="s3cret", cors=["https://ui.example"]))
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/").status_code == 200  # the page itself holds no data
        _error(c.get("/readyz"), 401, "unauthorized")
        _error(c.post("/v1/tokenize", json={"prompt": "a"}, headers={"Authorization": "Bearer wrong"}), 401)
        _error(c.post("/v1/tokenize", json={"prompt": "a"}, headers={"Authorization": "s3cret"}), 401)
        ok = {"Authorization": "Bearer s3cret"}
        deadline = time.monotonic() + 30
        while c.get("/readyz", headers=ok).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = c.post("/v1/tokenize", json={"prompt": "a"}, headers={**ok, "Origin": "https://ui.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"
        r = c.post("/v1/tokenize", json={"prompt": "a"}, headers={**ok, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    with TestClient(create_app(ServeConfig(models={"mini": te}))) as c:
        r = _ready(c).post("/v1/tokenize", json={"prompt": "a"}, headers={"Origin": "https://ui.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_docs_offline_metrics_and_models(client):
    docs = client.get("/docs").text + client.get("/static/docs.js").text
    page = client.get("/").text + client.get("/static/app.js").text + client.get("/static/style.css").text
    for text in (docs, page):
        assert "http://" not in text and "https://" not in text and "cdn" not in text.lower()
    assert "/openapi.json" in docs
    spec = client.get("/openapi.json").json()
    assert {"/v1/encode", "/v1/embeddings", "/v1/tokenize", "/v1/compare", "/healthz", "/readyz", "/metrics"} <= set(
        spec["paths"]
    )
    client.post("/v1/encode", json={"prompts": "a cat", "dialect": "a1111"})
    client.post("/v1/encode", json={"prompts": "a cat", "dialect": "a1111"})
    assert client.post("/v1/encode", json={"prompts": "a cat", "dialect": "no-such"}).status_code == 422
    metrics = client.get("/metrics").text
    for name in (
        'sdclip_requests_total{route="/v1/encode",status="200"}',
        "sdclip_request_seconds_bucket",
        "sdclip_batch_prompts_count",
        'sdclip_queue_depth{model="mini"}',
        "sdclip_cache_hits_total",
        "sdclip_cache_misses_total",
        'sdclip_requests_total{route="/v1/encode",status="422"}',
        "sdclip_requests_in_flight 1",
    ):
        assert name in metrics
    hits = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('sdclip_cache_hits_total{model="mini"}')
    ]
    assert hits and hits[0] > 0
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["mini", "other"] and models["default"] == "mini"
    assert client.post("/v1/tokenize", json={"prompt": "a", "model": "other"}).json()["model"] == "other"


# --- a real server: SIGTERM drains --------------------------------------------------------------------------


def _post(url: str, body: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _children(pid: int) -> list[int]:
    found = []
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{thread}/children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            pass
    return found


def _in_flight(base: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return float(re.search(r"^sdclip_requests_in_flight (\S+)$", text, re.M).group(1))


@AFFINITY
def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path):
    port = free_port()
    token = tmp_path / "token"
    token.write_text("t0k\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sdclip.cli",
            "serve",
            "--port",
            str(port),
            "--max-batch",
            "8",
            "--max-wait-ms",
            "1",
            "--log-level",
            "warning",
            "--model",
            "mini=sdclip-mini",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def alive() -> None:
            assert proc.poll() is None, proc.stdout.read().decode()

        wait_ready(base, 60, alive)
        from sdclip.serve.process import split_cores

        cores = split_cores()  # the HTTP process on the last allowed core, the model's on the others
        (model,) = [
            p for p in _children(proc.pid) if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        assert _thread_cores(proc.pid) == {frozenset(cores.http if cores else os.sched_getaffinity(0))}
        assert _thread_cores(model) == _model_cores()
        heavy = {"prompts": [f"{i} " + "a (red:1.1) star, " * 40 for i in range(40)], "dialect": "a1111"}
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(_post, base + "/v1/encode", heavy) for _ in range(12)]
            deadline = time.monotonic() + 30
            while _in_flight(base) < 12 + 1 and time.monotonic() < deadline:  # + this scrape: all 12 arrived
                time.sleep(0.02)
            assert not all(f.done() for f in futures)  # requests are in flight
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        assert [status for status, _ in results] == [200] * 12
        for _, body in results:
            assert json.loads(body)["tensors"]["hidden"]["shape"] == [40, 231, 128]
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the model's process ----------------------------------------------------------------------------------------


def test_frames_carry_tensors_of_every_dtype_and_errors():
    """What crosses between the HTTP process and a model's: tensors (any dtype and shape, views included) come back
    with their bits, beside the pickle; an error comes back as itself."""
    from sdclip.errors import BadInput
    from sdclip.serve.process import frame, unframe

    base = torch.randn(3, 5, 7)
    tensors = {
        "float32": base,
        "view": base[:, 1:4].transpose(0, 1),  # not contiguous
        "float16": base.half(),
        "bfloat16": base.bfloat16(),
        "int64": torch.arange(6).reshape(2, 3),
        "bool": base > 0,
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
    }
    answer = [sdclip.TextOutput(base, base[:, 0], None), tensors, BadInput("prompts[1]: no such embedding")]
    parts = frame(answer)
    out = unframe([bytearray(p) for p in parts[1:]])  # parts[0]: the header, read before the parts
    assert len(parts) > 3  # the tensors' bytes travel beside the pickle, not in it
    for name, t in tensors.items():
        assert out[1][name].dtype == t.dtype and out[1][name].shape == t.shape, name
        assert torch.equal(out[1][name], t), name
    assert (
        torch.equal(out[0].hidden, base) and torch.equal(out[0].pooled, base[:, 0]) and out[0].pooled_projected is None
    )
    assert isinstance(out[2], BadInput) and str(out[2]) == "prompts[1]: no such embedding"


def test_a_text_encoder_pickles_without_its_files(te):
    """The model process gets the encoder by pickling (its weights through shared memory): the copy encodes the
    same bits, and leaves the checkpoint's open files and the prefix cache's entries behind."""
    import pickle

    copy = pickle.loads(pickle.dumps(te))
    assert all(t.file is None for t in copy.info.towers) and copy.info.files == te.info.files
    assert len(copy.reuse.cache.entries) == 0 and copy.reuse.micro_batch == te.reuse.micro_batch
    for a, b in zip(te.encode(PROMPTS[:3]).__dict__.values(), copy.encode(PROMPTS[:3]).__dict__.values()):
        assert (a is None and b is None) or torch.equal(a, b)
    assert copy.fingerprint == te.fingerprint


def _model_processes(name: str) -> list:
    import multiprocessing

    return [p for p in multiprocessing.active_children() if p.name == f"sdclip-model-{name}"]


def _thread_cores(pid: int) -> set[frozenset[int]]:
    """The CPU affinity of each thread of a process."""
    found = set()
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            found.add(frozenset(os.sched_getaffinity(int(thread))))
        except OSError:  # it ended meanwhile
            pass
    return found


def _model_cores() -> set[frozenset[int]]:
    """What every thread of a model process is pinned to on this machine."""
    from sdclip.serve.process import split_cores

    cores = split_cores()
    return {frozenset(cores.models if cores else os.sched_getaffinity(0))}


def test_split_cores_leaves_the_last_allowed_core_to_http(monkeypatch):
    from sdclip.serve.process import Cores, model_threads, split_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {7, 3, 5})
    assert split_cores() == Cores(http=(7,), models=(3, 5))
    assert model_threads(split_cores(), 1) == 2 and model_threads(split_cores(), 2) == 1
    assert model_threads(Cores(http=(6,), models=(0, 1, 2, 3, 4, 5)), 4) == 1  # the models share the cores
    assert model_threads(None, 1) == 2  # unpinned: the cores less one
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2})
    assert split_cores() is None  # one core: nothing to split
    assert model_threads(None, 3) == 1
    monkeypatch.delattr(os, "sched_getaffinity")
    assert split_cores() is None  # no CPU affinity on this system


@AFFINITY
def test_a_killed_model_process_is_started_again(te):
    """A model's process that dies (killed, out of memory) fails the requests it held with 503 + Retry-After and is
    started again; the server keeps answering, with the same bits, and /metrics keeps counting its cache."""
    allowed = os.sched_getaffinity(0)
    app = create_app(ServeConfig(models={"restarts": te}))
    body = {"prompts": PROMPTS[:2], "dialect": "a1111"}
    want = sdclip.encode_prompts(te, PROMPTS[:2], dialect="a1111").hidden
    with TestClient(app) as c:
        _ready(c)
        (first,) = _model_processes("restarts")
        assert first.pid != os.getpid()
        assert _thread_cores(first.pid) == _model_cores()  # every thread, torch's included, off the HTTP core
        assert torch.equal(_tensor(c.post("/v1/encode", json=body).json()["tensors"]["hidden"]), want)
        os.kill(first.pid, signal.SIGKILL)
        first.join(10)
        deadline, answers = time.monotonic() + 60, []
        while True:
            r = c.post("/v1/encode", json=body)
            answers.append(r.status_code)
            if r.status_code == 200:
                break
            assert _error(r, 503, "model_restarting") and r.headers["Retry-After"] == "1"
            assert time.monotonic() < deadline, answers
            time.sleep(0.05)
        assert answers[0] == 503 and torch.equal(_tensor(r.json()["tensors"]["hidden"]), want)
        (second,) = _model_processes("restarts")
        assert second.pid != first.pid and second.is_alive()
        assert _thread_cores(second.pid) == _model_cores()
        assert c.post("/v1/encode", json=body).status_code == 200
        assert re.search(r'sdclip_cache_hits_total\{model="restarts"\} [1-9]', c.get("/metrics").text)
    assert _model_processes("restarts") == []  # shutdown ends it
    assert os.sched_getaffinity(0) == allowed  # create_app pins its models only, never the process it runs in


@AFFINITY
def test_pin_cores_off_leaves_the_model_process_on_every_core(te):
    with TestClient(create_app(ServeConfig(models={"unpinned": te}, pin_cores=False))) as c:
        _ready(c)
        (process,) = _model_processes("unpinned")
        assert _thread_cores(process.pid) == {frozenset(os.sched_getaffinity(0))}
        assert c.post("/v1/encode", json={"prompts": "a cat"}).status_code == 200
