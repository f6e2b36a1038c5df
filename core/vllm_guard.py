"""An ASGI middleware that vLLM's server loads (``--middleware core.vllm_guard.RequireKey``): every route needs
the bearer key but /health.

vLLM's own key check guards only some path prefixes (/v1, /v2, ...); /invocations answers a chat completion
without a key, and /tokenize, /metrics, /docs are open. vLLM listens on loopback only, but any local user can
reach loopback, so the launcher adds this guard whenever vLLM has a key (core.vllm_engine.plan_vllm). The key
is read from VLLM_API_KEY, which vLLM reads too, so it never appears on a command line.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets

OPEN_PATHS = frozenset({"/health"})  # the supervisor's liveness check; it says nothing about the model


class RequireKey:
    def __init__(self, app):
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        self._digest = hashlib.sha256(key.encode()).digest() if key else None

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        value = dict(headers).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            hashlib.sha256(token.strip().encode()).digest(), self._digest)

    async def __call__(self, scope, receive, send):
        if (self._digest is None or scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS"
                or scope["path"] in OPEN_PATHS or self._authorized(scope.get("headers") or [])):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps({"error": {"message": "Missing or invalid API key.", "type": "invalid_request_error",
                                     "param": None, "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
