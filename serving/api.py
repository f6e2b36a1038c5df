"""The OpenAI-compatible RAG gateway (FastAPI), with the Gradio chat mounted at "/".

    ASSISTANT_BUNDLE=bundles/latest ASSISTANT_VLLM_URL=http://127.0.0.1:8000/v1 \
        .venv/bin/uvicorn --factory serving.api:create_app_from_env --port 7860

Routes: GET /v1/models, POST /v1/chat/completions (streaming or not; the answer's passages in `sources`),
POST /v1/retrieve, GET /health (the process is up), GET /ready (indexes loaded and vLLM answering).
`assistant serve` starts vLLM and this app together.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
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


def error_response(exc: GatewayError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


def require_key(settings: GatewaySettings):
    """A dependency that checks `Authorization: Bearer <key>` when the gateway has a key."""

    async def check(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                   settings.api_key.encode()):
            raise Unauthorized("Missing or invalid API key. Send it as `Authorization: Bearer <key>` "
                               "(the key given to `assistant serve --api-key`).")

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
    async def chat_completions(req: ChatCompletionRequest):
        if req.n != 1:
            raise InvalidRequest("only n=1 is supported", param="n")
        service.get(req.model)  # an unknown model fails before any work, streaming or not
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        params = req.sampling_params()
        if not req.stream:
            out = await service.answer(req.model, messages, params, passages=req.passages)
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

    app = FastAPI(title=settings.title, description="OpenAI-compatible retrieval-augmented assistant",
                  lifespan=lifespan, docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    app.state.service = service
    app.state.settings = settings

    @app.exception_handler(GatewayError)
    async def on_gateway_error(_request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        message = f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid request')}"
        return error_response(InvalidRequest(message, param=".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = GatewayError(str(exc.detail), status=exc.status_code)
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(err)

    app.include_router(build_router(service, settings))

    if settings.ui:
        import gradio as gr

        from serving.ui import CSS, build_ui

        auth = None
        if settings.api_key:
            key = settings.api_key
            auth = lambda _user, password: secrets.compare_digest(str(password).encode(), key.encode())
        app = gr.mount_gradio_app(app, build_ui(service), path=settings.ui_path, auth=auth,
                                  auth_message="This assistant needs its API key: any user name, "
                                               "the key as the password.",
                                  footer_links=[], ssr_mode=False, css=CSS)
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn --factory entry point; settings from ASSISTANT_* environment variables."""
    return create_app(GatewaySettings.from_env())
