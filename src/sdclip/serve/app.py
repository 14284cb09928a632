"""The HTTP API: routes, request limits, errors, auth and CORS around one ``ModelWorker`` per model.

Errors are JSON ``{"error": {"type": ..., "message": ..., ...}}``: 400/422 for bad requests, 401 without the
token, 404 for an unknown model, 413 for a limit (with ``limit`` and ``value``), 503 + ``Retry-After`` when a
model's queue is full, the model is not loaded yet, or its process ended (it is started again).  Nothing a client
sends can raise a 500 or stop a model.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, Union

import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import sdclip
from sdclip.errors import BadInput, SdclipError

from .batcher import ModelWorker, QueueFull, ThreadBackend
from .inspect import describe_chunks
from .limits import LimitExceeded, Limits, TokenCounts, chunk_counted
from .metrics import Metrics
from .process import ModelProcessExited, ProcessBackend, model_threads, split_cores
from .work import Work

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INLINE_CHECK_CHARS = 4000  # prompts of a request parsed on the event loop; more go to a thread
OPEN_PATHS = ("/healthz",)  # answered without the token
STATIC_PATHS = ("/", "/docs", "/openapi.json", "/favicon.ico")  # no data: the page itself asks for the token


@dataclass
class ServeConfig:
    """``models``: name -> checkpoint (file, folder, repo id, ``sdclip-mini``) or a loaded ``TextEncoder``; the
    first is the default model."""

    models: dict[str, Union[str, sdclip.TextEncoder]] = field(default_factory=lambda: {"sdclip-mini": "sdclip-mini"})
    embeddings: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    max_batch: int = 256
    max_wait_ms: float = 5.0
    queue_size: int = 256
    limits: Limits = field(default_factory=Limits)
    token: str | None = None
    cors: list[str] = field(default_factory=list)
    model_process: bool = True  # each model in a process of its own (False: on a thread of the HTTP process)
    # torch threads per model process (default ``model_threads``: the model cores shared among the models);
    # with model_process=False, the count ``serve`` gives this process
    threads: int | None = None
    pin_cores: bool = True  # model processes on the allowed cores but the last, which ``serve`` keeps for HTTP


async def _disconnect(request: Request) -> None:
    """Returns once the client has gone away (the body is read by then, so the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.kind, self.extra, self.headers = status, kind, extra, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.kind, str(self), self.headers, **self.extra)


def error_response(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message, **extra}}, status, headers=headers)


def limit_response(e: LimitExceeded) -> JSONResponse:
    return error_response(413, "limit_exceeded", str(e), limit=e.name, value=e.value)


# --- request bodies -----------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, description="a served model's name (default: the first --model)")


class _Dialect(_Body):
    dialect: str | None = Field(
        "diffusers",
        description="a1111 | comfy | compel | diffusers (for /v1/encode, "
        "null: raw hidden states of one layer, as TextEncoder.encode)",
    )
    clip_skip: int | None = Field(None, ge=-64, le=64)
    emphasis: Literal["original", "no-norm", "ignore", "none"] = "original"
    steps: int = Field(20, ge=1, le=150, description="a1111: sampler steps of the prompt-editing schedule")
    comma_backtrack: int = Field(20, ge=0, le=75)
    truncate: bool = Field(True, description="compel: truncate_long_prompts")

    def chunk_options(self) -> dict[str, Any]:
        """The dialect options the client set: a dialect's chunker refuses those it does not take."""
        return {k: getattr(self, k) for k in ("steps", "comma_backtrack", "truncate") if k in self.model_fields_set}


class EncodeRequest(_Dialect):
    prompts: str | list[str]
    negative: str | list[str | None] | None = Field(
        None,
        description="one for all prompts, or one per prompt "
        "(null: none, which is the empty prompt or zeros as the front end does)",
    )
    step: int = Field(0, ge=0, le=1000, description="a1111: the sampler step whose prompt editing to encode")
    embeddings: list[str] | None = Field(None, description="textual-inversion names from --embeddings (default: all)")
    layer: int | None = Field(None, ge=-100, le=100, description="dialect null only: hidden-state index")
    final_norm: bool | None = Field(None, description="dialect null only")
    encoder: int = Field(1, ge=1, le=8, description="dialect null only: which text encoder (SDXL 2 = bigG)")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class EmbeddingsRequest(_Body):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # OpenAI clients send "user" and the like
    input: str | list[str]
    normalize: bool = Field(False, description="divide each vector by its L2 norm")
    encoding_format: Literal["float", "base64"] = "float"
    encoder: int = Field(1, ge=1, le=8)


class TokenizeRequest(_Dialect):
    prompt: str


class CompareRequest(_Body):
    a: str
    b: str
    encoder: int = Field(1, ge=1, le=8)


# --- the application --------------------------------------------------------------------------------------


class _BodyLimit:
    """Refuses bodies over ``limit`` bytes (413), by Content-Length or while reading a chunked body, which it
    buffers (at most ``limit`` bytes) before the application sees it."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = lambda: limit_response(LimitExceeded("max_body_bytes", self.limit, "the request body"))
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_big()(scope, receive, send)
        messages: list[Message] = []
        seen, more = 0, True
        while more:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.limit:
                return await too_big()(scope, receive, send)
            more = message.get("more_body", False)
        replay = iter(messages)

        async def replayed() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)


class _Observe:
    """Bearer-token check, requests in flight and the request metrics, as plain ASGI (no task per request)."""

    def __init__(self, app: ASGIApp, server: Server):
        self.app, self.server = app, server
        token = server.config.token
        self.expected = None if token is None else f"Bearer {token}".encode()

    def _open(self, scope: Scope) -> bool:
        path = scope["path"]
        return path in OPEN_PATHS or path in STATIC_PATHS or path.startswith("/static/") or scope["method"] == "OPTIONS"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if self.expected is not None and not self._open(scope):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(
                    401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, observed)
                self.server.count(scope, status, start)
                return
        self.server.in_flight += 1
        try:
            await self.app(scope, receive, observed)
        finally:
            self.server.in_flight -= 1
            self.server.count(scope, status, start)


class Server:
    """The served models (a ``ModelWorker`` each: queue, batcher, process) and the metrics; ``app`` is the FastAPI
    application."""

    def __init__(self, config: ServeConfig):
        if not config.models:
            raise BadInput("no model to serve")
        self.config = config
        self.metrics = Metrics()
        embeddings = sdclip.load_embeddings(config.embeddings) if config.embeddings else []
        self.cores = split_cores() if config.model_process and config.pin_cores else None
        self.threads = config.threads or model_threads(self.cores, len(config.models))

        def backend(name: str) -> ProcessBackend | ThreadBackend:
            if not config.model_process:
                return ThreadBackend(name, embeddings)
            return ProcessBackend(name, embeddings, self.threads, self.cores.models if self.cores else None)

        self.workers = {
            name: ModelWorker(
                name,
                self._loader(source),
                backend(name),
                max_batch=config.max_batch,
                max_wait_ms=config.max_wait_ms,
                queue_size=config.queue_size,
                on_batch=self.metrics.batch,
            )
            for name, source in config.models.items()
        }
        self.default = next(iter(self.workers))
        self.draining = False
        self.token_counts = TokenCounts()
        self.in_flight = 0  # requests between arrival and answer (the event loop's thread alone counts them)
        self.metrics.gauge(
            "sdclip_requests_in_flight",
            "gauge",
            "Requests being handled, this scrape included.",
            (),
            lambda: [((), self.in_flight)],
        )
        self.metrics.gauge(
            "sdclip_queue_depth",
            "gauge",
            "Requests waiting for a model's worker.",
            ("model",),
            lambda: [((n,), w.depth) for n, w in self.workers.items()],
        )
        for what in ("hits", "misses"):
            self.metrics.gauge(
                f"sdclip_cache_{what}_total",
                "counter",
                f"Conditioning cache {what} by model.",
                ("model",),
                lambda what=what: [((n,), getattr(w.backend, what)) for n, w in self.workers.items()],
            )
        self.metrics.gauge(
            "sdclip_ready",
            "gauge",
            "1 once the model is loaded and warmed.",
            ("model",),
            lambda: [((n,), float(w.ready.is_set() and not w.failed)) for n, w in self.workers.items()],
        )
        self.app = self._build()

    def _loader(self, source: Union[str, sdclip.TextEncoder]):
        if isinstance(source, sdclip.TextEncoder):
            return lambda: source
        return lambda: sdclip.load(source, dtype=self.config.dtype, device=self.config.device)

    # --- plumbing -------------------------------------------------------------------------------------------
    def worker(self, name: str | None) -> ModelWorker:
        name = self.default if name is None else name
        worker = self.workers.get(name)
        if worker is None:
            raise ApiError(
                404,
                "unknown_model",
                f"no model named {name!r}; this server has {', '.join(map(repr, self.workers))}",
                model=name,
            )
        if not worker.ready.is_set():
            raise ApiError(503, "not_ready", f"model {name!r} is still loading", {"Retry-After": "1"})
        if worker.failed:
            raise ApiError(503, "model_failed", f"model {name!r} failed to load: {worker.failed}")
        return worker

    async def run(self, worker: ModelWorker, work: Work, request: Request) -> Any:
        """Queue ``work`` and wait for it; a client that disconnects meanwhile cancels it (the batcher drops a
        cancelled request it has not sent: no encoding for nobody), answered 499 in the metrics."""
        try:
            future = worker.submit(work)
        except QueueFull as e:
            raise ApiError(
                503,
                "overloaded",
                f"model {worker.name!r}: {e}; retry later",
                {"Retry-After": "1"},
                limit="queue_size",
                value=e.limit,
            ) from None
        gone = asyncio.ensure_future(_disconnect(request))
        gone.add_done_callback(lambda _: future.cancel())  # a no-op once answered
        try:
            return await future
        except asyncio.CancelledError:
            if gone.done() and not gone.cancelled():  # the client went away (not: the server is stopping)
                raise ApiError(499, "client_closed_request", "the client disconnected before the answer") from None
            raise
        finally:
            gone.cancel()

    def check_prompts(self, prompts: list[str], what: str = "prompts") -> None:
        limits = self.config.limits
        if len(prompts) > limits.max_prompts:
            raise LimitExceeded("max_prompts", limits.max_prompts, f"{len(prompts)} {what}")
        for i, p in enumerate(prompts):
            if p is not None and len(p) > limits.max_chars:
                raise LimitExceeded("max_chars", limits.max_chars, f"{what}[{i}] ({len(p)} characters)")
            if p is not None and not _encodable(p):
                raise ApiError(
                    422, "bad_input", f"{what}[{i}] holds a lone surrogate (\\ud800-\\udfff), which no text can contain"
                )

    def check_tokens(self, count: int, what: str) -> None:
        if count > self.config.limits.max_tokens:
            raise LimitExceeded("max_tokens", self.config.limits.max_tokens, f"{what} ({count} tokens)")

    async def check_chunked(self, worker: ModelWorker, texts: list[tuple[str, str]], body: _Dialect) -> None:
        """The token limit, as each prompt's dialect counts tokens.  Here rather than in the model's process, which
        is the busier one; on the event loop for requests of ordinary size, on a thread for big ones (a megabyte of
        prompt text takes seconds to parse)."""

        def check() -> None:
            for what, text in texts:
                count = self.token_counts.count(worker.name, worker.te, text, body.dialect, body.chunk_options())
                self.check_tokens(count, what)

        if sum(len(text) for _, text in texts) <= INLINE_CHECK_CHARS:
            check()
        else:
            await asyncio.to_thread(check)

    # --- routes -----------------------------------------------------------------------------------------------
    async def encode(self, body: EncodeRequest, request: Request) -> Response:
        worker = self.worker(body.model)
        te = worker.te
        prompts = [body.prompts] if isinstance(body.prompts, str) else list(body.prompts)
        if not prompts:
            raise ApiError(422, "bad_input", "no prompts to encode")
        one_negative = body.negative is None or isinstance(body.negative, str)
        negatives = [body.negative] if one_negative else list(body.negative)
        self.check_prompts(prompts)
        self.check_prompts([n for n in negatives if n is not None], "negatives")
        if body.dialect is None:
            if body.negative is not None or body.embeddings is not None:
                raise ApiError(
                    422, "bad_input", "negative and embeddings need a dialect (dialect null encodes raw hidden states)"
                )
            for i, p in enumerate(prompts):
                self.check_tokens(len(te.tokenizers[0].tokenize(p)), f"prompts[{i}]")
            te.tower(body.encoder).resolve_layer(
                te.usages[body.encoder - 1].layer if body.layer is None else body.layer
            )
            options = dict(encoder=body.encoder, layer=body.layer, final_norm=body.final_norm)
            out = await self.run(worker, Work("hidden", tuple(options.items()), prompts, {"options": options}), request)
            tensors = {"hidden": out.hidden, "pooled": out.pooled, "pooled_projected": out.pooled_projected}
        else:
            if body.layer is not None or body.final_norm is not None or body.encoder != 1:
                raise ApiError(
                    422,
                    "bad_input",
                    "layer, final_norm and encoder select raw hidden states; with a "
                    "dialect the front end decides (use clip_skip)",
                )
            if not one_negative and len(negatives) != len(prompts):
                raise ApiError(
                    422,
                    "bad_input",
                    f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one each",
                )
            self._known_embeddings(body.embeddings)

            options = dict(
                dialect=body.dialect,
                clip_skip=body.clip_skip,
                emphasis=body.emphasis,
                steps=body.steps,
                comma_backtrack=body.comma_backtrack,
                truncate=body.truncate,
                embedding_names=None if body.embeddings is None else sorted(body.embeddings),
            )
            await self.check_chunked(
                worker,
                [(f"prompts[{i}]", t) for i, t in enumerate(prompts)]
                + [(f"negatives[{i}]", t) for i, t in enumerate(negatives) if t is not None],
                body,
            )
            payload = dict(options=options, step=body.step, negatives=negatives, one_negative=one_negative)
            cond = await self.run(worker, Work("conditioning", None, prompts, payload), request)
            tensors = {
                "hidden": cond.hidden,
                "pooled": cond.pooled,
                "negative_hidden": cond.negative_hidden,
                "negative_pooled": cond.negative_pooled,
            }
        dtype = DTYPES[body.dtype]
        tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items() if v is not None}
        if body.dialect is None or dtype != torch.float32:  # a conditioner's float32 output is checked finite
            for k, v in tensors.items():
                if not bool(torch.isfinite(v).all()):
                    raise ApiError(
                        422,
                        "non_finite",
                        f"the {k} of these prompts holds inf or NaN in {body.dtype} (a weight too large for the "
                        f"dtype, or non-finite model weights?)",
                        tensor=k,
                    )
        name = body.model or self.default
        if "application/octet-stream" in request.headers.get("accept", ""):
            metadata = {"model": name, "family": te.family, "dialect": str(body.dialect)}
            return Response(_safetensors(tensors, metadata), media_type="application/octet-stream")
        return _tensors_json({"model": name, "family": te.family, "dialect": body.dialect}, tensors)

    def _known_embeddings(self, names: list[str] | None) -> None:
        if names is None:
            return
        worker_embeddings = next(iter(self.workers.values())).embeddings
        known = {e.name for e in worker_embeddings} | {e.token for e in worker_embeddings}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ApiError(
                422,
                "unknown_embedding",
                f"no embedding named {', '.join(map(repr, unknown))} in --embeddings ({len(worker_embeddings)} loaded)",
            )

    async def embeddings(self, body: EmbeddingsRequest, request: Request) -> Response:
        worker = self.worker(body.model)
        te = worker.te
        inputs = [body.input] if isinstance(body.input, str) else list(body.input)
        if not inputs:
            raise ApiError(422, "bad_input", "input is empty")
        self.check_prompts(inputs, "inputs")
        te.tower(body.encoder)  # a missing encoder is a BadInput before queueing
        tokenizer = te.tokenizers[body.encoder - 1]
        counts = []
        for i, p in enumerate(inputs):
            counts.append(len(tokenizer.tokenize(p)))
            self.check_tokens(counts[-1], f"input[{i}]")
        options = dict(encoder=body.encoder, hidden=False)
        out = await self.run(worker, Work("embeddings", tuple(options.items()), inputs, {"options": options}), request)
        vectors = out.pooled_projected if out.pooled_projected is not None else out.pooled
        vectors = vectors.float()
        if not bool(torch.isfinite(vectors).all()):
            raise ApiError(422, "non_finite", "the embeddings hold inf or NaN (non-finite model weights?)")
        if body.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        rows = vectors.cpu().numpy()
        data = []
        for i, v in enumerate(rows if body.encoding_format == "base64" else rows.astype("float64")):
            # float64 rows: their JSON numbers are the shortest that read back as these very values
            value: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64" else v
            data.append({"object": "embedding", "index": i, "embedding": value})
        used = sum(min(n + 2, 77) for n in counts)  # the ids the encoder read: BOS, prompt, EOS
        return _json(
            {
                "object": "list",
                "data": data,
                "model": body.model or self.default,
                "usage": {"prompt_tokens": used, "total_tokens": used},
            }
        )

    async def tokenize(self, body: TokenizeRequest) -> Response:
        worker = self.worker(body.model)
        te = worker.te
        self.check_prompts([body.prompt], "prompt")
        tokenizer = te.tokenizers[0]
        tree, count = chunk_counted(te, body.prompt, body.dialect, body.chunk_options(), strict=True)
        self.check_tokens(count, "prompt")
        return _json(
            {
                "model": body.model or self.default,
                "dialect": body.dialect,
                "ids": tokenizer.encode(body.prompt),
                "tokens": [
                    {"id": t.id, "text": t.text, "start": t.start, "end": t.end} for t in tokenizer.tokens(body.prompt)
                ],
                "chunks": describe_chunks(tree, tokenizer),
            }
        )

    async def compare(self, body: CompareRequest, request: Request) -> dict:
        worker = self.worker(body.model)
        self.check_prompts([body.a, body.b], "prompts")
        for which, text in (("a", body.a), ("b", body.b)):
            self.check_tokens(len(worker.te.tokenizers[0].tokenize(text)), which)
        worker.te.tower(body.encoder)
        return await self.run(worker, Work("compare", None, [body.a, body.b], {"encoder": body.encoder}), request)

    def readyz(self) -> JSONResponse:
        states = {
            n: ("failed: " + w.failed if w.failed else "ready" if w.ready.is_set() else "loading")
            for n, w in self.workers.items()
        }
        ok = all(s == "ready" for s in states.values()) and not self.draining
        return JSONResponse({"ready": ok, "models": states}, 200 if ok else 503)

    # --- assembly ---------------------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def lifespan(app: FastAPI):
            for w in self.workers.values():
                w.start()
            yield
            self.draining = True
            for w in self.workers.values():  # uvicorn has waited for in-flight requests; finish the queues
                await w.stop()

        app = FastAPI(
            title="sdclip serve",
            version=sdclip.__version__,
            docs_url=None,
            redoc_url=None,
            lifespan=lifespan,
            description="Stable Diffusion conditioning, CLIP embeddings and prompt "
            "tokenization from one warm text encoder.",
        )
        static = resources.files("sdclip.serve") / "static"

        @app.exception_handler(ApiError)
        async def api_error(request: Request, e: ApiError):
            return e.response()

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, e: RequestValidationError):
            errors = [
                {"loc": [str(x) for x in err.get("loc", ())], "message": err.get("msg", "")} for err in e.errors()
            ]
            first = errors[0] if errors else {"loc": [], "message": "invalid request"}
            kind = (
                "malformed_json" if any(err.get("type") == "json_invalid" for err in e.errors()) else "invalid_request"
            )
            return error_response(422, kind, f"{'.'.join(first['loc'])}: {first['message']}", errors=errors)

        @app.exception_handler(LimitExceeded)
        async def limit_exceeded(request: Request, e: LimitExceeded):
            return limit_response(e)

        @app.exception_handler(BadInput)
        async def bad_input(request: Request, e: BadInput):
            return error_response(422, "bad_input", str(e))

        @app.exception_handler(ModelProcessExited)
        async def model_restarting(request: Request, e: ModelProcessExited):
            return error_response(503, "model_restarting", str(e), {"Retry-After": "1"})

        @app.exception_handler(SdclipError)
        async def sdclip_error(request: Request, e: SdclipError):
            return error_response(422, "cannot_encode", str(e))

        @app.exception_handler(Exception)
        async def internal(request: Request, e: Exception):
            return error_response(500, "internal", f"{type(e).__name__}: {e}")

        app.add_middleware(_Observe, server=self)
        if self.config.cors:
            from fastapi.middleware.cors import CORSMiddleware

            app.add_middleware(
                CORSMiddleware,
                allow_origins=self.config.cors,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "Accept"],
            )
        app.add_middleware(_BodyLimit, limit=self.config.limits.max_body_bytes)

        app.post(
            "/v1/encode",
            summary="Prompts -> conditioning (encode_prompts), as safetensors or JSON",
            responses={200: {"content": {"application/octet-stream": {}}}},
        )(self.encode)
        app.post("/v1/embeddings", summary="OpenAI-compatible embeddings: projected pooled vectors")(self.embeddings)
        app.post("/v1/tokenize", summary="Token ids, tokens with offsets, a dialect's chunks and weights")(
            self.tokenize
        )
        app.post("/v1/compare", summary="Per-token cosine similarity of two prompts at every layer")(self.compare)
        app.get("/healthz", summary="The process answers")(lambda: {"ok": True})
        app.get("/readyz", summary="Every model loaded and warmed")(self.readyz)
        app.get("/metrics", summary="Prometheus metrics")(
            lambda: Response(self.metrics.render(), media_type="text/plain; version=0.0.4")
        )
        app.get("/v1/models", summary="The served models")(self.models)
        app.get("/", include_in_schema=False)(lambda: FileResponse(str(static / "index.html")))
        app.get("/docs", include_in_schema=False)(lambda: FileResponse(str(static / "docs.html")))
        app.mount("/static", StaticFiles(directory=str(static)), name="static")
        return app

    def models(self) -> dict:
        from sdclip.prompts import DIALECTS

        return {
            "object": "list",
            "default": self.default,
            "dialects": list(DIALECTS),
            "data": [
                {
                    "id": n,
                    "object": "model",
                    "ready": w.ready.is_set() and not w.failed,
                    "family": w.te.family if w.te is not None else None,
                }
                for n, w in self.workers.items()
            ],
        }

    def count(self, scope: Scope, status: int, start: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "other")
        self.metrics.request(path, status, time.perf_counter() - start)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json(content: Any) -> Response:
    """A JSON answer of plain lists, dicts, strings, numbers and numpy arrays, without FastAPI's walk over every
    value (orjson: floats written several times faster than ``json``, as the same shortest round-trip numbers;
    a non-finite number, which JSON lacks, as null)."""
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def _safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors body: through safetensors' numpy writer (per tensor, its torch writer's detours cost about
    100 us more than the whole numpy path), or its torch writer for bfloat16, which numpy lacks."""
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}  # the numpy writer reads the raw buffer
    if any(t.dtype == torch.bfloat16 for t in tensors.values()):
        from safetensors.torch import save

        return save(tensors, metadata)
    from safetensors.numpy import save as save_numpy

    return save_numpy({k: t.numpy() for k, t in tensors.items()}, metadata)


def _tensors_json(head: dict, tensors: dict[str, torch.Tensor]) -> Response:
    """``head`` plus ``"tensors": {name: {"shape", "dtype", "data": base64}}``, the base64 bytes put in as they are
    (a JSON encoder would scan megabytes of them for characters to escape)."""
    parts = []
    for name, t in tensors.items():
        meta = json.dumps({"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")})[:-1]
        raw = t.cpu().contiguous().view(torch.uint8).numpy()
        parts.append(json.dumps(name).encode() + b":" + meta.encode() + b',"data":"' + base64.b64encode(raw) + b'"}')
    body = json.dumps(head, ensure_ascii=False)[:-1].encode() + b',"tensors":{' + b",".join(parts) + b"}}"
    return Response(body, media_type="application/json")


def create_app(config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI application for ``config`` (at startup each model loads, then starts its process).  The model
    processes keep off the last allowed core, but this process is not pinned to it: ``serve`` does that."""
    return Server(config or ServeConfig()).app


__all__ = ["ServeConfig", "Limits", "Server", "create_app"]
