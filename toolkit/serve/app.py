"""The HTTP application: TEI's and OpenAI's routes over the served models, errors as one-line messages, metrics.

    app = create_app(Embedder.from_artifacts("ws/emb/onnx"), Reranker.from_artifacts("ws/rr/onnx"), Limits())
    uvicorn.run(app)   # what `toolkit serve` does (or Ray Serve, one app per replica)

Nothing a client sends is a 500: a body not sent as JSON (its Content-Type) is 415, one that is not UTF-8 JSON 400,
one that does not match its schema 422, a request over a limit 413, a full model 429 (with Retry-After), a route whose
model is not loaded 404, a backend failure 503 for the requests it hit, a request the server's shutdown cuts off 503. A
request whose client leaves before its answer is stopped (its rows still waiting for a batch never run) and counted as
499. The app owns the models it is given: its shutdown runs what is queued, then closes them.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext

import numpy as np
import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.routing import Match
from typing_extensions import override

from toolkit.api import Embedder, Reranker
from toolkit.errors import ToolkitError
from toolkit.runtime import CPU_BUDGET
from toolkit.serve.metrics import ServiceMetrics
from toolkit.serve.schemas import (
    UNION_TAGS,
    Document,
    DocumentsRerankRequest,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    RankedText,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    Token,
    TokenizeRequest,
    as_texts,
)
from toolkit.serve.service import (
    EmbeddingService,
    Limits,
    ModelNotLoaded,
    Overloaded,
    RerankService,
    ServiceError,
)
from toolkit.tasks import EMBEDDING, RERANKER, Task

RETRY_AFTER_S = 1
ERROR_TYPES = {400: "validation", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "validation", 429: "overloaded", 503: "unavailable"}
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client left before the answer: what metrics count


class Services:
    """The models this app serves, by task; asking for one that is absent is a 404 naming the flag that loads it."""

    def __init__(self, embedder: Embedder | None, reranker: Reranker | None, limits: Limits):
        self.metrics = ServiceMetrics()
        self.loaded_at = int(time.time())  # what /v1/models answers as each model's `created`
        self.stopping = False  # the server is shutting down (`drain`)
        self.by_task = {}
        for model, service in ((embedder, EmbeddingService), (reranker, RerankService)):
            if model is not None:
                self.by_task[model.task.name] = service(model, limits, self.metrics)

    def embedding(self) -> EmbeddingService:
        """The embedding model's service, or ModelNotLoaded."""
        return self._get(EMBEDDING, "--embedding")

    def reranking(self) -> RerankService:
        """The reranker's service, or ModelNotLoaded."""
        return self._get(RERANKER, "--reranker")

    def _get(self, task: Task, flag: str):
        if task.name not in self.by_task:
            raise ModelNotLoaded(f"this server has no {task.name} model; start it with {flag} SET_DIR")
        return self.by_task[task.name]

    def loaded(self) -> list:
        """The services present."""
        return list(self.by_task.values())

    def admitted(self, route_tags: list) -> AbstractContextManager:
        """A place among the concurrent requests of the model a route runs (the tag naming it), or Overloaded; none
        for a route of no model, or of one not loaded (the route answers 404)."""
        service = next((self.by_task[tag] for tag in route_tags if tag in self.by_task), None)
        return service.admitted() if service else nullcontext()

    def drain(self) -> None:
        """Run what is queued now, and each request still to come as it arrives (the server is stopping)."""
        self.stopping = True
        for service in self.loaded():
            service.scheduler.drain()

    def close(self) -> None:
        """Run what is queued, then stop every model."""
        for service in self.loaded():
            service.close()


def create_app(embedder: Embedder | None = None, reranker: Reranker | None = None,
               limits: Limits = Limits()) -> FastAPI:
    """The ASGI app serving the given models (at least one) under `limits`."""
    if embedder is None and reranker is None:
        raise ToolkitError("give the server at least one model: --embedding SET_DIR and/or --reranker SET_DIR")
    services = Services(embedder, reranker, limits.check())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(services.close)

    # no redirect from /embed/ to /embed: its Location would be built from the Host header (http:// behind a TLS
    # proxy); a 404 names the route instead, as TEI answers
    app = FastAPI(title="qwen3-deploy", summary="Qwen3-Embedding / Qwen3-Reranker artifacts over HTTP",
                  lifespan=lifespan, redirect_slashes=False)
    app.state.services = services
    app.include_router(tei_routes(services))
    app.include_router(openai_routes(services))
    app.include_router(ops_routes(services, limits))
    add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=limits.payload_limit)
    app.add_middleware(StopWhenClientLeaves)
    app.add_middleware(AnswerRequestsCutOffByShutdown, services=services)
    app.add_middleware(CountAnswers, metrics=services.metrics)  # outermost: it sees every answer
    return app


# ---- routes ---------------------------------------------------------------------------------------------------------
class Utf8JsonRequest(Request):
    """A request whose body is read as JSON from UTF-8 only (JSON's encoding, RFC 8259): Starlette hands the bytes to
    Python's reader, which also takes UTF-16 and UTF-32 and the bytes of a lone surrogate. Not UTF-8: FastAPI's 400."""

    @override
    async def json(self):
        return json.loads((await self.body()).decode("utf-8-sig"))  # a leading BOM is ignored, as RFC 8259 allows


def is_json(content_type: str | None) -> bool:
    """Whether a Content-Type is JSON's (`application/json`, `application/*+json`), as FastAPI reads one."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    return media_type == "application/json" or media_type.startswith("application/") and media_type.endswith("+json")


class JsonBodyRoute(APIRoute):
    """A route whose body is a UTF-8 JSON object sent as `Content-Type: application/json`: any other type (curl -d's
    form encoding, text/plain, none) is refused with 415 naming the header, as TEI refuses it, before the body is
    read; FastAPI would hand the bytes to the schema, whose 422 says "Input should be a valid dictionary". A route
    tagged with a model's name holds a place among that model's concurrent requests from before its body is read
    (`Services.admitted`): a request over the limit is refused (429) for the cost of its headers (each refused body
    was read and parsed: 300 of 1.9 MB at a limit of 8 took the server to 1 GB). Not a dependency: FastAPI reads the
    body before it runs those."""

    @override
    def get_route_handler(self):
        handle = super().get_route_handler()
        if self.body_field is None:
            return handle

        async def handle_json_body(request: Request) -> Response:
            if not is_json(request.headers.get("content-type")):
                raise HTTPException(415, "send the body as JSON with the header Content-Type: application/json")
            with request.app.state.services.admitted(self.tags):
                return await handle(Utf8JsonRequest(request.scope, request.receive))

        return handle_json_body


def tei_routes(services: Services) -> APIRouter:
    """TEI's `/embed` (and `/`, Hugging Face InferenceClient's feature extraction), `/rerank`, `/tokenize`."""
    router = APIRouter(route_class=JsonBodyRoute)  # a model's routes tagged with its name: admission, /docs' groups

    @router.post("/embed", response_model=list[list[float]], tags=[EMBEDDING.name])
    @router.post("/", include_in_schema=False, tags=[EMBEDDING.name])
    async def embed(request: EmbedRequest) -> Response:
        """Vectors for `inputs`, in order."""
        service = services.embedding()
        vectors, _ = await service.embed(as_texts(request.inputs),
                                         service.instruction_for(request.prompt_name, request.instruction),
                                         request.truncate, request.dimensions, request.normalize)
        return VectorsResponse(vectors)

    @router.post("/rerank", response_model_exclude_none=True, tags=[RERANKER.name])
    async def rerank(request: RerankRequest) -> list[RankedText]:
        """`texts` ranked for `query`, best first."""
        order, scores, _ = await services.reranking().rerank(request.query, request.texts, request.instruction,
                                                            request.truncate, request.raw_scores, request.top_n)
        return [RankedText(index=i, score=float(scores[i]), text=request.texts[i] if request.return_text else None)
                for i in order]

    @router.post("/tokenize", tags=[EMBEDDING.name])
    async def tokenize(request: TokenizeRequest) -> list[list[Token]]:
        """The tokens `/embed` runs for each input (instruction included, and with `add_special_tokens` the closing
        <|endoftext|>), each with the characters of the input it covers."""
        service = services.embedding()
        rows = await service.tokens(as_texts(request.inputs),
                                    service.instruction_for(request.prompt_name, request.instruction),
                                    request.truncate, request.add_special_tokens)
        tokenizer = service.model.tokenizer
        return [[Token(id=t, text=tokenizer.decode([t]), special=t in tokenizer.special_ids, start=start, stop=stop)
                 for t, start, stop in row]
                for row in rows]

    return router


def openai_routes(services: Services) -> APIRouter:
    """OpenAI's `/v1/embeddings` and `/v1/models`, Cohere / Jina's `/v1/rerank`."""
    router = APIRouter(prefix="/v1", route_class=JsonBodyRoute)

    @router.get("/models")
    async def models() -> dict:
        """The served models in OpenAI's list (what OpenAI-compatible clients discover models by), named as the /v1
        answers name them; `created`: when this server loaded them."""
        return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": services.loaded_at,
                                            "owned_by": "qwen3-deploy"} for s in services.loaded()]}

    @router.post("/embeddings", response_model=EmbeddingsResponse, tags=[EMBEDDING.name])
    async def embeddings(request: EmbeddingsRequest) -> Response:
        """Vectors for text or token-id inputs; `usage.prompt_tokens` counts every token run."""
        service, texts = services.embedding(), request.texts()
        if texts is None:
            vectors, tokens = await service.embed_ids(request.token_ids(), request.dimensions)
        else:
            instruction = service.instruction_for(request.prompt_name, request.instruction)
            vectors, tokens = await service.embed(texts, instruction, truncate=None, dimensions=request.dimensions)
        as_base64 = request.encoding_format == "base64"
        return VectorsResponse({"object": "list",
                                "data": [{"object": "embedding", "index": i,
                                          "embedding": base64_floats(v) if as_base64 else v}
                                         for i, v in enumerate(vectors)],
                                "model": service.model_name,
                                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @router.post("/rerank", response_model_exclude_none=True, tags=[RERANKER.name])
    async def rerank(request: DocumentsRerankRequest) -> RerankResponse:
        """`documents` (texts or `{"text": ...}` objects) ranked for `query`, best first, with `relevance_score` =
        P(yes); `return_documents` echoes each as `{"text": ...}`."""
        service, texts = services.reranking(), request.texts()
        order, scores, tokens = await service.rerank(request.query, texts, request.instruction, request.truncate,
                                                     top_n=request.top_n)
        results = [RerankResult(index=i, relevance_score=float(scores[i]),
                                document=Document(text=texts[i]) if request.return_documents else None)
                   for i in order]
        return RerankResponse(model=service.model_name, results=results,
                              usage=RerankUsage(total_tokens=tokens))

    return router


class VectorsResponse(Response):
    """JSON holding float32 vectors, written by orjson straight from the arrays: each float as the shortest text that
    reads back as the same float32 (as TEI writes them). Half the bytes of Python's float64 text, and no per-float
    validation: at 1,024 floats a vector this was the largest part of a request's CPU in the server and the client,
    CPU that the compute threads lose on a small machine. The routes declare the body's schema (`response_model`)."""

    media_type = "application/json"

    @override
    def render(self, content) -> bytes:
        return orjson.dumps(content, default=_contiguous, option=orjson.OPT_SERIALIZE_NUMPY)


def _contiguous(value):
    """orjson writes C-contiguous arrays itself and hands any other (vectors cut to `dimensions` may be views) here."""
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def base64_floats(vector: np.ndarray) -> str:
    """OpenAI's base64 encoding: the little-endian float32 bytes."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def ops_routes(services: Services, limits: Limits) -> APIRouter:
    """`/health`, `/info`, `/metrics`."""
    router = APIRouter()

    @router.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what many load balancers' health checks send
    async def health() -> JSONResponse:
        """200 while every model takes and runs requests, else 503."""
        ok = all(s.healthy() for s in services.loaded())
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @router.get("/info")
    async def info() -> dict:
        """The models (task, source, dtype, backend, buckets, max input length), the server's limits, and this
        process (a Ray Serve replica's own) with its compute-thread budget."""
        return {"models": {s.name: s.describe() for s in services.loaded()}, "limits": vars(limits),
                "process": os.getpid(), "compute_threads": CPU_BUDGET.threads}

    @router.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(services.metrics.render(), media_type=services.metrics.content_type)

    return router


# ---- errors ---------------------------------------------------------------------------------------------------------
def error_response(path: str, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """An error in the shape the route's clients read: OpenAI's under /v1, TEI's elsewhere."""
    kind = ERROR_TYPES.get(status, "error")
    body = ({"error": {"message": message, "type": kind, "code": status}} if path.startswith("/v1/")
            else {"error": message, "error_type": kind})
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(error: RequestValidationError) -> str:
    """The schema errors as one line, the first problem of each field: `inputs.0: Input should be a valid string;
    ...`, `documents.2.text: ...`. An error's location is a field, list positions and the fields of an object in a
    list, less the union alternatives the value was read as (`UNION_TAGS`)."""
    problems: dict = {}
    for e in error.errors():
        if e["type"] == "json_invalid":
            # the position is in the location; Python's reader ends some reasons with "at" for it
            return f"body: {e['msg']} ({e['ctx']['error'].removesuffix(' at')} at character {e['loc'][1]})"
        if e["type"] == "missing" and e["loc"] == ("body",):
            return "body: empty; send a JSON object"
        field, *inner = e["loc"][1:] or ("body",)
        path = ".".join([str(field), *(str(p) for p in inner if p not in UNION_TAGS)])
        problems.setdefault(field, f"{path}: {e['msg']}")
    return "; ".join(problems.values())


def add_error_handlers(app: FastAPI) -> None:
    """Map every error a request can meet to its status and a one-line message."""

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError):
        return error_response(request.url.path, 422, validation_message(error))

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(error, Overloaded) else None
        return error_response(request.url.path, error.status, str(error), headers)

    @app.exception_handler(ToolkitError)  # the API refused a value the schema let through (e.g. dimensions)
    async def invalid_value(request: Request, error: ToolkitError):
        return error_response(request.url.path, 422, str(error))

    @app.exception_handler(HTTPException)  # unknown route, wrong method, a body too large or FastAPI cannot parse
    async def http_error(request: Request, error: HTTPException):
        path = request.url.path
        fixes = {400: "body: not readable as JSON (invalid UTF-8, or nested too deeply); send a UTF-8 JSON object",
                 405: f"{request.method} {path} is not served; use {(error.headers or {}).get('Allow')}"}
        if path != "/" and matching_route({**request.scope, "path": path.rstrip("/")}):
            fixes[404] = f"{request.method} {path} is not served; use {path.rstrip('/')}"
        return error_response(request.url.path, error.status_code, fixes.get(error.status_code, str(error.detail)),
                              error.headers)


# ---- middleware -----------------------------------------------------------------------------------------------------
class HttpMiddleware:
    """An ASGI middleware that acts on HTTP requests (`handle`); lifespan events pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        """ASGI entry."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send):
        """One HTTP request."""
        raise NotImplementedError


class BodyLimit(HttpMiddleware):
    """Refuse a request body over `limit` bytes with 413, whether it declares its length or streams it. The 413 is
    raised where the route reads the body (FastAPI passes an HTTPException from `receive` to the app's handlers), so
    it is answered, and counted, as the route's."""

    def __init__(self, app, limit: int):
        super().__init__(app)
        self.limit = limit

    @override
    async def handle(self, scope, receive, send):
        declared = dict(scope["headers"]).get(b"content-length", b"")
        received = 0

        async def receive_within_limit():
            nonlocal received
            if declared.isdigit() and int(declared) > self.limit:
                raise self.too_large()
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise self.too_large()
            return message

        await self.app(scope, receive_within_limit, send)

    def too_large(self) -> HTTPException:
        """The 413, naming the limit and the fix."""
        return HTTPException(413, f"request body is larger than the payload limit ({self.limit} bytes); send fewer or "
                                  "shorter inputs, or raise --payload-limit")


class StopWhenClientLeaves(HttpMiddleware):
    """Cancel a request whose client leaves before its answer starts (neither Starlette nor uvicorn stops the handler,
    so its rows would still run): the cancellation reaches the await of its outputs, which withdraws its rows still
    waiting for a batch (`ServedModel.run`); rows in a running batch finish, their outputs dropped. The request then
    ends without an answer. The client is watched once the app has read the whole body: until then, `receive` is the
    app's."""

    @override
    async def handle(self, scope, receive, send):
        body_read, answering, left = asyncio.Event(), False, False

        async def receive_noting_body():
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read.set()
            return message

        async def send_noting_answer(message):
            nonlocal answering
            answering = True
            await send(message)

        async def cancel_when_client_leaves():
            nonlocal left
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            if not answering:  # else the disconnect is the answer's end (ASGI says so once a response is sent)
                left = True
                app.cancel()

        app = asyncio.ensure_future(self.app(scope, receive_noting_body, send_noting_answer))
        watcher = asyncio.ensure_future(cancel_when_client_leaves())
        try:
            await app
        except asyncio.CancelledError:
            # this request itself was cancelled (by the server), not only its app: also where the client left too
            if not left or asyncio.current_task().cancelling():
                raise
        finally:
            watcher.cancel()


class AnswerRequestsCutOffByShutdown(HttpMiddleware):
    """While the server shuts down, answer a request it cancels before its answer started (uvicorn cancels those still
    running when its graceful timeout ends: a client that stalls mid-body, say) with a 503 in the route's error shape:
    uvicorn would log the cancellation's traceback and answer a plain-text 500."""

    def __init__(self, app, services: Services):
        super().__init__(app)
        self.services = services

    @override
    async def handle(self, scope, receive, send):
        answering = False

        async def send_noting_answer(message):
            nonlocal answering
            answering = True
            await send(message)

        try:
            await self.app(scope, receive, send_noting_answer)
        except asyncio.CancelledError:
            if answering or not self.services.stopping:
                raise
            asyncio.current_task().uncancel()  # answered instead: the request ends here, as uvicorn wants it to
            await error_response(scope["path"], 503, "the server is shutting down and stopped this request before "
                                                     "it finished; retry it")(scope, receive, send)


class CountAnswers(HttpMiddleware):
    """Count every answer by route template and status, and time it. 499 (nginx's status for a client that left
    before the answer): a request stopped without an answer (`StopWhenClientLeaves`), or an answer written to
    nobody."""

    def __init__(self, app, metrics: ServiceMetrics):
        super().__init__(app)
        self.metrics = metrics

    @override
    async def handle(self, scope, receive, send):
        started, status = time.perf_counter(), [None]

        async def noting_status(message):
            if message["type"] == "http.response.start":
                left = await Request(scope, receive).is_disconnected()
                status[0] = CLIENT_CLOSED_REQUEST if left else message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_status)
        except BaseException:
            status[0] = status[0] or 500  # what the server answers for an error before any answer
            raise
        finally:
            self.metrics.answered(route_path(scope), status[0] or CLIENT_CLOSED_REQUEST, time.perf_counter() - started)


def route_path(scope) -> str:
    """The template of the route a request went to ("unmatched": none). FastAPI notes its API routes in the scope,
    not its own (/docs, /openapi.json), which are matched here."""
    return getattr(scope.get("route") or matching_route(scope), "path", "unmatched")


def matching_route(scope):
    """The app's route that takes a request of this scope (path and method), or None."""
    return next((route for route in scope["app"].routes if route.matches(scope)[0] is Match.FULL), None)
