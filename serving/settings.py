"""Settings of the RAG gateway: which bundles it serves, where vLLM is, and how requests are handled.

`assistant serve` fills these in from the command line; `GatewaySettings.from_env()` lets the gateway run
on its own in front of a vLLM started elsewhere:

    ASSISTANT_BUNDLE=bundles/latest ASSISTANT_VLLM_URL=http://127.0.0.1:8000/v1 \
        .venv/bin/uvicorn --factory serving.api:create_app_from_env --port 7860
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def read_api_key(key_file: str | Path | None = None, environ: dict | None = None) -> str | None:
    """The gateway's key: the first line of ``key_file`` when given, else env ASSISTANT_API_KEY, else None (an
    open gateway). Never from a command-line value: a command line is readable by every local user (ps)."""
    environ = os.environ if environ is None else environ
    if key_file:
        path = Path(key_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").strip().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
        if not lines or not lines[0].strip():
            raise ValueError(f"the API key file {path} is empty")
        return lines[0].strip()
    return environ.get("ASSISTANT_API_KEY") or None


@dataclass
class ServedModel:
    """One served bundle: the name clients ask for, its folder, and the model name vLLM knows it by."""

    name: str
    bundle_dir: Path
    upstream_model: str
    weights: str = "base"  # what vLLM serves for it: 'merged', 'adapter' or 'base' (shown in the UI header)


@dataclass
class GatewaySettings:
    models: list[ServedModel]
    vllm_base_url: str = "http://127.0.0.1:8000/v1"
    vllm_api_key: str | None = None  # key the gateway sends to vLLM
    api_key: str | None = None  # key clients must send to the gateway (None: open)
    local_generation: bool = False  # generate with transformers in-process instead of calling vLLM (debugging)
    upstream_timeout_s: float = 300.0  # longest wait for one upstream generation
    connect_timeout_s: float = 3.0  # a vLLM that does not accept a connection by then counts as down
    ready_probe_timeout_s: float = 10.0  # /ready asks for one token; an engine that gives none by then is not ready
    ready_cache_s: float = 3.0  # a probe's answer is reused this long
    history_messages: int = 6  # earlier turns (user + assistant messages) kept in the prompt
    retrieval_device: str = "cpu"  # the query embedder is small; keeping it off the GPU leaves vLLM its memory
    # torch threads for query embedding. vLLM keeps the cores busy; one thread embeds a short query fastest
    # beside it (MiniLM, 2-core machine, vLLM loaded: 13 ms median with 1 thread, 77 ms with 2). 0: leave as is.
    retrieval_threads: int = 1
    # Renumber a citation marker that points at a passage not holding the text it follows (core/citations.py).
    ground_citations: bool = True
    # Limits checked before any work, each refused with a 4xx naming it. The message count is far above any
    # history (only history_messages are kept), so a long client-side transcript still works.
    max_body_bytes: int = 2 * 1024 * 1024
    max_messages: int = 10_000
    max_message_chars: int = 32_000  # longer than any served model's context in characters
    max_tokens_limit: int = 2048  # the most a client may ask to generate
    # Answers in flight (generating or queued in vLLM) past which a new one gets a 429 with Retry-After at once:
    # above the 64 concurrent streams the gateway is expected to carry, and far below what would make a
    # queued request wait past the upstream timeout on a small machine.
    max_pending: int = 128
    ui: bool = True  # mount the Gradio chat at ui_path
    ui_path: str = "/"
    title: str = "Domain assistant"

    @classmethod
    def from_env(cls) -> GatewaySettings:
        """ASSISTANT_BUNDLE (one or more, separated by ':'), ASSISTANT_VLLM_URL, ASSISTANT_VLLM_API_KEY,
        ASSISTANT_API_KEY, ASSISTANT_MODEL_NAME, ASSISTANT_UPSTREAM_MODEL, ASSISTANT_GROUND_CITATIONS (0: off)."""
        from core.bundle import Bundle
        from core.device import get_device
        from core.vllm_engine import choose_weights

        raw = os.environ.get("ASSISTANT_BUNDLE", "bundles")
        models: list[ServedModel] = []
        for path in [p for p in raw.split(os.pathsep) if p]:
            bundle = Bundle.load(path)
            first = not models
            name = (os.environ.get("ASSISTANT_MODEL_NAME") if first else None) or bundle.served_model_name
            if any(m.name == name for m in models):
                raise ValueError(f"two bundles are served as {name!r}; give them distinct serve.served_model_name")
            upstream = (os.environ.get("ASSISTANT_UPSTREAM_MODEL") if first else None) or name
            # What `python -m serving.vllm_server` would serve for this bundle on this machine.
            weights, _ = choose_weights(bundle, get_device())
            models.append(ServedModel(name, bundle.path, upstream, weights))
        key = read_api_key()
        return cls(models=models, vllm_base_url=os.environ.get("ASSISTANT_VLLM_URL", cls.vllm_base_url),
                   vllm_api_key=os.environ.get("ASSISTANT_VLLM_API_KEY") or key, api_key=key,
                   ground_citations=os.environ.get("ASSISTANT_GROUND_CITATIONS", "1").lower() not in ("0", "false", "no"))
