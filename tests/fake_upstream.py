"""A small OpenAI-compatible chat server standing in for vLLM in tests that must not wait for a real one.

    .venv/bin/python tests/fake_upstream.py --port 18500 --model assistant

Its answer names the source of the first passage it was given and cites it ("... [1]"), so a test can tell
that the gateway's prompt reached it; every request body is kept in `app.state.requests`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Self

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

_SOURCE = re.compile(r'<passage id="1" source="([^"(]*)')


def answer_for(messages: list[dict]) -> str:
    last = messages[-1]["content"] if messages else ""
    m = _SOURCE.search(last)
    return f"According to {m.group(1).strip()} the answer is in the first passage [1]." if m else "No passages were given."


def make_app(models: list[str], api_key: str | None = None, token_delay_s: float = 0.0,
             answer: Callable[[list[dict]], str] = answer_for) -> FastAPI:
    app = FastAPI()
    app.state.requests = []
    app.state.stall_s = 0.0  # a test sets it to make every chat hang this long before answering (a hung engine)

    def refused(request: Request) -> JSONResponse | None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return None

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def list_models(request: Request):
        if (r := refused(request)) is not None:
            return r
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                                           for m in models]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if (r := refused(request)) is not None:
            return r
        body = await request.json()
        app.state.requests.append(body)
        if app.state.stall_s:
            await asyncio.sleep(app.state.stall_s)
        if body.get("model") not in models:
            return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                           "type": "NotFoundError", "param": "model", "code": 404}}, 404)
        words = answer(body["messages"]).split(" ")
        limit = int(body.get("max_tokens") or 64)
        words = words[:limit]
        finish = "length" if len(words) == limit else "stop"
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                 "total_tokens": prompt_tokens + len(words)}
        cid, created = "chatcmpl-fake", int(time.time())
        if not body.get("stream"):
            return {"id": cid, "object": "chat.completion", "created": created, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                                 "finish_reason": finish}], "usage": usage}

        async def events():
            def chunk(delta, finish_reason=None, **extra):
                return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                              "model": body["model"], "choices": [
                                                  {"index": 0, "delta": delta, "finish_reason": finish_reason}],
                                              **extra}) + "\n\n"
            yield chunk({"role": "assistant", "content": ""})
            for i, w in enumerate(words):
                if token_delay_s:
                    await asyncio.sleep(token_delay_s)
                yield chunk({"content": (" " if i else "") + w})
            yield chunk({}, finish)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                             "model": body["model"], "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedServer:
    """Run an ASGI app with uvicorn in a background thread (for tests)."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


if __name__ == "__main__":
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", action="append", default=[])
    p.add_argument("--api-key", default=None)
    p.add_argument("--exit-after", type=float, default=None, help="exit with status 3 after this many seconds")
    p.add_argument("--token-delay", type=float, default=0.0, help="seconds between streamed words")
    a = p.parse_args()
    if a.exit_after is not None:
        def _exit_later():
            time.sleep(a.exit_after)
            print("fake upstream: simulated crash", flush=True)
            import os

            os._exit(3)

        threading.Thread(target=_exit_later, daemon=True).start()
    uvicorn.run(make_app(a.model or ["assistant"], a.api_key, token_delay_s=a.token_delay), host=a.host, port=a.port,
                log_level="warning")
