"""The OpenAI-compatible RAG gateway (FastAPI), with the Gradio chat mounted at "/".

    ASSISTANT_BUNDLE=bundles/latest ASSISTANT_VLLM_URL=http://127.0.0.1:8000/v1 \
        .venv/bin/uvicorn --factory serving.api:create_app_from_env --port 7860

Routes: GET /v1/models, POST /v1/chat/completions (streaming or not; the answer's passages in `sources`),
POST /v1/retrieve, GET /health (the process is up), GET /ready (indexes loaded and vLLM answering).
`assistant serve` starts vLLM and this app together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.bundle import REPORT_FILE
from serving.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    DeltaMessage,
    ModelCard,
    ModelList,
    ResponseMessage,
    RetrieveRequest,
    RetrieveResponse,
    completion_id,
)
from serving.rag_service import GatewayError, InvalidRequest, RagService, to_sources
from serving.settings import GatewaySettings


class Unauthorized(GatewayError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class RequestTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class BodyLimit:
    """ASGI middleware: a request body past ``max_bytes`` gets a 413 in OpenAI's error format before any route
    reads it (by its Content-Length), or as soon as the bytes received pass it (a chunked body), so no route
    ever holds more than the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def message(self) -> str:
        return f"The request body is larger than this gateway accepts ({self.max_bytes:,} bytes)."

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(RequestTooLarge(self.message()))(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException passes FastAPI's body parsing unchanged and reaches on_http_error.
                    raise HTTPException(status_code=413, detail=self.message())
            return message

        return await self.app(scope, counted, send)


class LoginThrottle:
    """The chat UI's login check (any user name, the key as the password). After ``free`` failed logins within
    ``window_s``, every attempt waits ``delay_s`` in a single line before it is checked, so guessing runs at no
    more than one try per ``delay_s`` however many are sent at once (Gradio tells the check nothing about the
    client, so the line is shared; it forms only while failures keep coming)."""

    def __init__(self, key: str, free: int = 5, window_s: float = 60.0, delay_s: float = 1.0):
        self.key = key.encode()
        self.free, self.window_s, self.delay_s = free, window_s, delay_s
        self.failures: list[float] = []
        self._line = asyncio.Lock()

    def _check(self, password) -> bool:
        ok = secrets.compare_digest(str(password).encode(), self.key)
        if not ok:
            self.failures.append(time.monotonic())
        return ok

    async def check(self, _user, password) -> bool:
        """The coroutine Gradio calls (a bound coroutine method: Gradio awaits only what inspect calls a
        coroutine function, and an instance with an async __call__ is not one)."""
        cutoff = time.monotonic() - self.window_s
        self.failures = [t for t in self.failures if t > cutoff]
        if len(self.failures) < self.free:
            return self._check(password)
        async with self._line:
            await asyncio.sleep(self.delay_s)
            return self._check(password)


async def unless_gone(request: Request, work, poll_s: float = 0.25):
    """``await work``, unless the client disconnects first: then the work is cancelled (the upstream request
    closes with it, which tells vLLM to stop generating) and None is returned. Streaming answers get the same
    from their generator being closed."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None
    finally:
        if not task.done():  # our own cancellation (server shutdown): take the work with us
            task.cancel()


class QueueGate:
    """ASGI middleware: while the gateway's queue is full, a chat request from a client with the key gets its 429
    before its body is read or parsed, so refusing costs next to nothing when it matters most (under a burst,
    next to a vLLM that keeps the cores busy). The route's own admission (RagService._admit) still decides."""

    def __init__(self, app, service: RagService, settings: GatewaySettings):
        self.app, self.service, self.settings = app, service, settings

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope.get("method") == "POST" and scope["path"] == "/v1/chat/completions"
                and (full := self.service.queue_full()) is not None and self._keyed(scope)):
            return await error_response(full)(scope, receive, send)
        return await self.app(scope, receive, send)

    def _keyed(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        return has_key(header, self.settings.api_key)


def check_limits(req: ChatCompletionRequest, settings: GatewaySettings) -> None:
    """Refuse a request past the gateway's limits before any retrieval or generation (400, naming the field)."""
    if len(req.messages) > settings.max_messages:
        raise InvalidRequest(f"messages: {len(req.messages):,} messages; at most {settings.max_messages:,} are "
                             "accepted", param="messages")
    for i, m in enumerate(req.messages):
        if len(m.text()) > settings.max_message_chars:
            raise InvalidRequest(f"messages.{i}.content: {len(m.text()):,} characters; at most "
                                 f"{settings.max_message_chars:,} are accepted", param=f"messages.{i}.content")
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, field)
        if value is not None and value > settings.max_tokens_limit:
            raise InvalidRequest(f"{field}: {value}; at most {settings.max_tokens_limit} tokens are generated "
                                 "per answer", param=field)


def error_response(exc: GatewayError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if getattr(exc, "retry_after_s", None):
        headers = {"Retry-After": str(exc.retry_after_s)}
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


def has_key(authorization: str, key: str | None) -> bool:
    """Whether an Authorization header value is `Bearer <key>` (always, for a gateway without a key)."""
    if not key:
        return True
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


def require_key(settings: GatewaySettings):
    """A dependency that checks `Authorization: Bearer <key>` when the gateway has a key."""

    async def check(request: Request) -> None:
        if not has_key(request.headers.get("authorization", ""), settings.api_key):
            raise Unauthorized("Missing or invalid API key. Send it as `Authorization: Bearer <key>` "
                               "(the key `assistant serve` was given: env ASSISTANT_API_KEY or --api-key-file).")

    return check


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def build_router(service: RagService, settings: GatewaySettings) -> APIRouter:
    router = APIRouter()
    auth = [Depends(require_key(settings))]
    started = int(time.time())

    @router.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @router.get("/ready")
    async def ready() -> JSONResponse:
        ok, detail = await service.ready()
        return JSONResponse(detail, status_code=200 if ok else 503)

    @router.get("/v1/models", dependencies=auth)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=a.name, created=started, bundle_id=a.bundle.bundle_id,
                                         weights=a.served.weights) for a in service.assistants.values()])

    @router.get("/v1/models/{model_id}/report", dependencies=auth, response_class=HTMLResponse)
    async def report_card(model_id: str) -> HTMLResponse:
        """The bundle's report card: what fine-tuning changed, on held-out questions (eval/report.html)."""
        path = service.get(model_id).bundle.file(REPORT_FILE)
        if not path.is_file():
            raise GatewayError(f"the bundle of {model_id!r} has no report card; `assistant eval BUNDLE --report "
                               "FILE` writes one", status=404, code="report_not_found")
        return HTMLResponse(path.read_text(encoding="utf-8"))

    @router.get("/v1/models/{model_id}", dependencies=auth)
    async def get_model(model_id: str) -> ModelCard:
        a = service.get(model_id)
        return ModelCard(id=a.name, created=started, bundle_id=a.bundle.bundle_id, weights=a.served.weights)

    @router.post("/v1/retrieve", dependencies=auth)
    async def retrieve(req: RetrieveRequest) -> RetrieveResponse:
        a = service.get(req.model)
        hits, ms = await service.retrieve(a.name, req.query, req.k)
        return RetrieveResponse(model=a.name, query=req.query, data=to_sources(hits), retrieval_ms=round(ms, 2))

    @router.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        if req.n != 1:
            raise InvalidRequest("only n=1 is supported", param="n")
        check_limits(req, settings)
        service.get(req.model)  # an unknown model fails before any work, streaming or not
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        params = req.sampling_params()
        if not req.stream:
            out = await unless_gone(request, service.answer(req.model, messages, params, passages=req.passages))
            if out is None:  # nobody is listening any more; the generation was cancelled
                return Response(status_code=499)
            return ChatCompletionResponse(
                model=req.model, choices=[Choice(message=ResponseMessage(content=out["text"]),
                                                 finish_reason=out["finish_reason"])],
                usage=out["usage"], sources=out["sources"], retrieval_query=out["query"],
                retrieval_ms=out["retrieval_ms"], abstained=out["abstained"])
        events = service.answer_events(req.model, messages, params, passages=req.passages)
        # Wait for retrieval and the first token before sending headers, so that a bad request or a model
        # server that is down gets a real status code instead of an error inside a 200 stream.
        try:
            head = [await anext(events), await anext(events)]
        except BaseException:
            await events.aclose()
            raise
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(req.model, _chain(head, events), include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router


async def _chain(head: list, rest: AsyncIterator) -> AsyncIterator:
    for item in head:
        yield item
    async for item in rest:
        yield item


async def _stream(model: str, events: AsyncIterator, include_usage: bool) -> AsyncIterator[bytes]:
    cid, created = completion_id(), int(time.time())

    def chunk(delta: DeltaMessage, finish: str | None = None, **extra) -> bytes:
        body = ChatCompletionChunk(id=cid, created=created, model=model,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish)], **extra)
        return _sse(body.model_dump(exclude_none=True))

    yield chunk(DeltaMessage(role="assistant", content=""))
    try:
        async for ev in events:
            if ev.kind == "delta":
                yield chunk(DeltaMessage(content=ev.text))
            elif ev.kind == "done":
                yield chunk(DeltaMessage(), ev.finish_reason, sources=ev.sources, retrieval_query=ev.query,
                            retrieval_ms=ev.retrieval_ms, abstained=ev.abstained)
                if include_usage and ev.usage is not None:
                    body = ChatCompletionChunk(id=cid, created=created, model=model, choices=[], usage=ev.usage)
                    yield _sse(body.model_dump(exclude_none=True))
    except GatewayError as exc:
        # Headers are already sent; OpenAI's clients raise on an `error` event in the stream.
        yield _sse(exc.to_dict())
    yield _sse("[DONE]")


def create_app(settings: GatewaySettings, service: RagService | None = None) -> FastAPI:
    """The gateway app: routes, OpenAI-shaped errors, and the chat UI at settings.ui_path."""
    service = service or RagService.from_settings(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await service.close()

    # No open docs: the schema is served behind the key (below), like every other route.
    app = FastAPI(title=settings.title, description="OpenAI-compatible retrieval-augmented assistant",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.settings = settings
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(QueueGate, service=service, settings=settings)

    @app.exception_handler(GatewayError)
    async def on_gateway_error(_request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
            where = [p for p in first.get("loc", []) if isinstance(p, int)]
            at = f" (at character {where[0]})" if where else ""
            return error_response(InvalidRequest(f"the request body is not valid JSON{at}"))
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        message = f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid request')}"
        return error_response(InvalidRequest(message, param=".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = GatewayError(str(exc.detail), status=exc.status_code,
                           code="request_too_large" if exc.status_code == 413 else None)
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(err)

    app.include_router(build_router(service, settings))

    @app.get("/api/openapi.json", dependencies=[Depends(require_key(settings))], include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    if settings.ui:
        import gradio as gr

        from serving.ui import CSS, build_ui

        auth = LoginThrottle(settings.api_key).check if settings.api_key else None
        app = gr.mount_gradio_app(app, build_ui(service), path=settings.ui_path, auth=auth,
                                  auth_message="This assistant needs its API key: any user name, "
                                               "the key as the password.",
                                  footer_links=[], ssr_mode=False, css=CSS)
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn --factory entry point; settings from ASSISTANT_* environment variables."""
    return create_app(GatewaySettings.from_env())
