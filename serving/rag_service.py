"""The work behind the gateway and the UI: retrieve for the conversation, build the prompt, ask the model.

The model is reached through an upstream: vLLM's OpenAI-compatible server through the official `openai`
client (the normal case), or transformers in-process (`assistant serve --no-vllm`, for debugging). The
HTTP router and the Gradio UI both call `RagService.answer_events`, so what the UI shows is what the API
returns.

    python -c "import asyncio; from serving.rag_service import *; from serving.settings import *; \
s = RagService.from_settings(GatewaySettings([ServedModel('assistant', 'bundles/latest', 'assistant')])); \
print(asyncio.run(s.retrieve('assistant', 'When do I top-dress maize?'))[0][0])"
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from core.abstention import Abstainer, bundle_abstainer
from core.bundle import CHUNKS_FILE, HELDOUT_FILE, INDEX_DIR, Bundle, read_chunks
from core.citations import CitationGrounder, ground_citations
from core.focus import PassageFocus, bundle_focus
from core.prompting import REFUSAL, build_messages, parse_citations
from core.retrieval import RetrievalResult, Retriever
from core.text import STOPWORDS
from serving.protocol import Source, Usage
from serving.settings import GatewaySettings, ServedModel

# --------------------------------------------------------------------------------------------- errors


class GatewayError(Exception):
    """An error with an HTTP status and OpenAI's error fields; the router turns it into a response."""

    status = 500
    type = "server_error"
    code: str | None = None
    param: str | None = None

    def __init__(self, message: str, *, status: int | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status or self.status
        self.param = param if param is not None else self.param
        self.code = code if code is not None else self.code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(GatewayError):
    status, type = 400, "invalid_request_error"


class ModelNotFound(GatewayError):
    status, type, code, param = 404, "invalid_request_error", "model_not_found", "model"


class UpstreamUnavailable(GatewayError):
    status, type, code = 503, "service_unavailable", "model_server_unreachable"


class UpstreamError(GatewayError):
    status, type, code = 502, "upstream_error", "model_server_error"


class TooManyRequests(GatewayError):
    """The gateway's queue to the model server is full; the client should retry after ``retry_after_s``."""

    status, type, code = 429, "rate_limit_error", "queue_full"
    retry_after_s = 1


# ------------------------------------------------------------------------------ conversation handling

# Words that point back at an earlier turn; a question holding one is searched together with the previous
# question ("How do I control it?" after "What is fall armyworm?").
_ANAPHORA = frozenset([
    "it", "its", "they", "them", "their", "theirs", "this", "that", "these", "those", "there", "he", "she",
    "him", "her", "one", "ones", "same", "such", "former", "latter"])
_FOLLOW_UP_OPENERS = ("and ", "also ", "what about", "how about", "what else", "then ", "so ", "but ")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
SHORT_QUERY_WORDS = 3  # a latest turn with this many content words or fewer is read as a follow-up


def user_turns(messages: Sequence[dict]) -> list[str]:
    return [m["content"] for m in messages if m.get("role") == "user" and str(m.get("content") or "").strip()]


def is_follow_up(question: str) -> bool:
    """Short or anaphoric questions depend on the previous turn for their meaning."""
    q = question.strip().lower()
    words = _WORD.findall(q)
    content = [w for w in words if w not in STOPWORDS and w not in _ANAPHORA]
    return (len(content) <= SHORT_QUERY_WORDS or any(w in _ANAPHORA for w in words)
            or q.startswith(_FOLLOW_UP_OPENERS))


def retrieval_query(messages: Sequence[dict]) -> str:
    """What to search for: the latest user turn, preceded by the previous user turn when it is a follow-up."""
    turns = user_turns(messages)
    if not turns:
        raise InvalidRequest("the conversation has no user message to answer", param="messages")
    latest = turns[-1].strip()
    if len(turns) > 1 and is_follow_up(latest):
        return f"{turns[-2].strip()} {latest}"
    return latest


def split_conversation(messages: Sequence[dict], keep: int) -> tuple[str, list[dict]]:
    """(latest user question, up to `keep` earlier user/assistant messages). The client's system messages are
    dropped: the bundle's system prompt, which fences passages as data, is the one that applies."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"
                     and str(m.get("content") or "").strip()), default=None)
    if last_user is None:
        raise InvalidRequest("the conversation has no user message to answer", param="messages")
    history = [{"role": m["role"], "content": str(m.get("content") or "")} for m in messages[:last_user]
               if m.get("role") in ("user", "assistant") and str(m.get("content") or "").strip()]
    return str(messages[last_user]["content"]).strip(), (history[-keep:] if keep > 0 else [])


def snippet(text: str, limit: int = 240) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1].rstrip() + "…"


def prompt_passages(hits: Sequence[RetrievalResult]) -> list[dict]:
    return [h.to_dict() for h in hits]


def to_sources(hits: Sequence[RetrievalResult], cited: Sequence[int] = ()) -> list[Source]:
    return [Source(rank=i, source=h.source, location=h.location, title=h.title, chunk_id=h.chunk_id,
                   score=h.score, snippet=snippet(h.text), text=h.text, cited=i in cited)
            for i, h in enumerate(hits, start=1)]


# ------------------------------------------------------------------------------------------ upstreams


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    usage: Usage


class OpenAIUpstream:
    """vLLM (or any OpenAI-compatible server) through the official async client."""

    def __init__(self, settings: GatewaySettings):
        import httpx
        from openai import AsyncOpenAI

        self.base_url = settings.vllm_base_url
        self.client = AsyncOpenAI(base_url=settings.vllm_base_url, api_key=settings.vllm_api_key or "EMPTY",
                                  max_retries=0,
                                  timeout=httpx.Timeout(settings.upstream_timeout_s,
                                                        connect=settings.connect_timeout_s))
        self.connect_timeout_s = settings.connect_timeout_s
        self.probe_timeout_s = settings.ready_probe_timeout_s

    def _translate(self, exc: Exception) -> GatewayError:
        import openai

        if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError)):
            reason = str(exc).strip().rstrip(".")
            return UpstreamUnavailable(
                f"The language model server (vLLM at {self.base_url}) is not reachable ({reason}). "
                "It may still be starting, or it has stopped; see the vLLM log.")
        if isinstance(exc, openai.APIStatusError):
            detail = exc.message
            if exc.status_code == 400:
                return InvalidRequest(f"The model server refused the request: {detail}")
            if exc.status_code in (401, 403):
                return UpstreamError("The model server refused the gateway's API key; start vLLM and the "
                                     "gateway with the same key.")
            if exc.status_code == 404:
                return UpstreamError(f"The model server does not serve the expected model: {detail}")
            return UpstreamError(f"The model server failed ({exc.status_code}): {detail}")
        return UpstreamError(f"The model server failed: {exc!r}")

    async def complete(self, model: str, messages: list[dict], params: dict) -> Completion:
        try:
            resp = await self.client.chat.completions.create(model=model, messages=messages, **params)
        except Exception as exc:
            raise self._translate(exc) from exc
        choice = resp.choices[0]
        u = resp.usage
        usage = Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                      total_tokens=u.total_tokens) if u else Usage()
        return Completion(choice.message.content or "", choice.finish_reason, usage)

    async def stream(self, model: str, messages: list[dict], params: dict) -> AsyncIterator[tuple[str, Any]]:
        """Yields ('delta', text), then ('finish', reason) and ('usage', Usage)."""
        try:
            stream = await self.client.chat.completions.create(
                model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **params)
            try:
                async for chunk in stream:
                    for choice in chunk.choices:
                        if choice.delta and choice.delta.content:
                            yield "delta", choice.delta.content
                        if choice.finish_reason:
                            yield "finish", choice.finish_reason
                    if chunk.usage:
                        u = chunk.usage
                        yield "usage", Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                             total_tokens=u.total_tokens)
            finally:
                # A client that goes away mid-answer closes this generator; closing the upstream stream
                # tells vLLM to stop generating for it.
                await stream.close()
        except GatewayError:
            raise
        except Exception as exc:
            raise self._translate(exc) from exc

    async def check(self, model: str) -> tuple[bool, str]:
        """Whether the engine generates: one token of ``model``, within the probe timeout. Listing the models
        would not do: vLLM's HTTP server answers that while its engine is dead or hung."""
        start = time.perf_counter()
        try:
            await self.client.chat.completions.create(model=model, messages=[{"role": "user", "content": "ok"}],
                                                      max_tokens=1, temperature=0.0, timeout=self.probe_timeout_s)
        except Exception as exc:  # noqa: BLE001
            import openai

            if isinstance(exc, openai.APITimeoutError):
                return False, (f"the language model server (vLLM at {self.base_url}) did not generate one token "
                               f"of {model!r} in {self.probe_timeout_s:g} s: its engine is hung or overloaded")
            return False, self._translate(exc).message
        return True, f"model {model!r} generated a token in {(time.perf_counter() - start) * 1000:.0f} ms"

    async def close(self) -> None:
        await self.client.close()


class LocalUpstream:
    """transformers in-process, one generation at a time (`assistant serve --no-vllm`; slow, for debugging)."""

    def __init__(self, bundles: dict[str, Bundle]):
        self.bundles = bundles
        self._models: dict[str, tuple[Any, Any]] = {}
        self._lock = asyncio.Lock()

    def _load(self, model: str):
        if model not in self._models:
            from serving.local_assistant import bundle_generator

            self._models[model] = bundle_generator(self.bundles[model])
        return self._models[model]

    async def stream(self, model: str, messages: list[dict], params: dict) -> AsyncIterator[tuple[str, Any]]:
        from threading import Thread

        import torch
        from transformers import TextIteratorStreamer

        async with self._lock:
            lm, tok = await asyncio.to_thread(self._load, model)
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            batch = tok(prompt, return_tensors="pt", add_special_tokens=False).to(lm.device)
            limit = int(params.get("max_tokens") or self.bundles[model].max_new_tokens)
            temperature = float(params.get("temperature") or 0.0)
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)

            result = {}

            def run():
                with torch.no_grad():
                    result["ids"] = lm.generate(**batch, max_new_tokens=limit, streamer=streamer,
                                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                                **sampling)

            worker = Thread(target=run, daemon=True)
            worker.start()
            pieces = iter(streamer)
            while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                if piece:
                    yield "delta", piece
            worker.join()
            n_in = int(batch["input_ids"].shape[1])
            n_out = int(result["ids"].shape[1]) - n_in if "ids" in result else 0
            yield "finish", "length" if n_out >= limit else "stop"
            yield "usage", Usage(prompt_tokens=n_in, completion_tokens=n_out, total_tokens=n_in + n_out)

    async def complete(self, model: str, messages: list[dict], params: dict) -> Completion:
        text, finish, usage = "", None, Usage()
        async for kind, value in self.stream(model, messages, params):
            if kind == "delta":
                text += value
            elif kind == "finish":
                finish = value
            else:
                usage = value
        return Completion(text, finish, usage)

    async def check(self, model: str) -> tuple[bool, str]:
        return True, f"generating {model!r} in-process with transformers"

    async def close(self) -> None:
        return None


# ------------------------------------------------------------------------------------------- service


@dataclass
class Assistant:
    """One served bundle, ready to answer."""

    served: ServedModel
    bundle: Bundle
    retriever: Retriever
    examples: list[str] = field(default_factory=list)
    focus: PassageFocus | None = None  # cuts the passages the LLM reads; None: whole passages
    abstainer: Abstainer | None = None  # says when the passages are too weak to answer from; None: never

    @property
    def name(self) -> str:
        return self.served.name


@dataclass
class AnswerEvent:
    kind: str  # 'sources' (first, before generation), 'delta', then 'done'
    text: str = ""
    sources: list[Source] = field(default_factory=list)
    query: str = ""
    retrieval_ms: float = 0.0
    finish_reason: str | None = None
    usage: Usage | None = None
    abstained: bool = False  # the abstention rule answered: the model was not asked


def example_questions(bundle: Bundle, limit: int = 4) -> list[str]:
    """Questions to offer in the UI: the bundle's held-out questions, else ones made from section headings."""
    out: list[str] = []
    heldout = bundle.file(HELDOUT_FILE)
    if heldout.is_file():
        for line in heldout.read_text(encoding="utf-8").splitlines():
            if line.strip():
                q = json.loads(line).get("question", "").strip()
                if q and q not in out:
                    out.append(q)
            if len(out) >= limit:
                return out
    seen_sources: set[str] = set()
    for c in read_chunks(bundle.file(INDEX_DIR) / CHUNKS_FILE):
        parts = [p.strip() for p in c.location.split(">") if p.strip()]
        if len(parts) < 2 or c.source in seen_sources:
            continue
        seen_sources.add(c.source)
        topic = re.sub(r"\s*\([^)]*\)", "", parts[0]).strip()
        out.append(f"{topic}: what does the handbook say about {parts[-1][0].lower() + parts[-1][1:]}?")
        if len(out) >= limit:
            break
    return out


class RagService:
    def __init__(self, settings: GatewaySettings, assistants: Sequence[Assistant], upstream):
        if not assistants:
            raise ValueError("the gateway needs at least one bundle to serve")
        self.settings = settings
        self.assistants = {a.name: a for a in assistants}
        self.upstream = upstream
        # Retrieval runs off the event loop, one query at a time: it is a few milliseconds of CPU, and
        # running several at once on a small machine only makes them contend with vLLM for cores.
        self._retrieval_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval")
        self._probe: tuple[float, bool, str] | None = None  # (when, ok, detail) of the last readiness probe
        self.pending = 0  # answers admitted and not finished: generating in vLLM or waiting in its queue

    @classmethod
    def from_settings(cls, settings: GatewaySettings, upstream=None) -> RagService:
        if settings.retrieval_threads > 0 and not settings.local_generation:
            import torch

            torch.set_num_threads(settings.retrieval_threads)
        assistants = []
        for served in settings.models:
            bundle = Bundle.load(served.bundle_dir)
            retriever = Retriever.load(bundle, device=settings.retrieval_device)
            focus = bundle_focus(bundle, retriever)
            assistants.append(Assistant(served, bundle, retriever, example_questions(bundle), focus,
                                        bundle_abstainer(bundle, retriever)))
        if upstream is None:
            upstream = (LocalUpstream({a.served.upstream_model: a.bundle for a in assistants})
                        if settings.local_generation else OpenAIUpstream(settings))
        return cls(settings, assistants, upstream)

    @property
    def default_model(self) -> str:
        return next(iter(self.assistants))

    def get(self, model: str | None) -> Assistant:
        if model is None:
            return self.assistants[self.default_model]
        if model not in self.assistants:
            served = ", ".join(sorted(self.assistants))
            raise ModelNotFound(f"The model `{model}` does not exist. This gateway serves: {served}.")
        return self.assistants[model]

    async def retrieve(self, model: str | None, query: str, k: int | None = None
                       ) -> tuple[list[RetrievalResult], float]:
        """(passages, milliseconds spent embedding, searching and fusing)."""
        hits, ms, _ = await self._retrieve(self.get(model), query, k, decide=False)
        return hits, ms

    async def _retrieve(self, assistant: Assistant, query: str, k: int | None, decide: bool = True
                        ) -> tuple[list[RetrievalResult], float, bool]:
        """(passages, milliseconds, whether the bundle's abstention rule says the passages cannot answer: asked
        only with ``decide``, for an answer)."""
        def run():
            start = time.perf_counter()
            # A pinned count is served as asked; the bundle's default is top_k less the passages far behind.
            found = assistant.retriever.lookup([query], k or assistant.bundle.top_k, trim=not k)[0]
            abstain = decide and assistant.abstainer is not None and assistant.abstainer.decide(query, found)
            return assistant.retriever.results(found.ranked), (time.perf_counter() - start) * 1000, abstain

        return await asyncio.get_running_loop().run_in_executor(self._retrieval_pool, run)

    def _params(self, assistant: Assistant, params: dict | None) -> dict:
        params = dict(params or {})
        params.setdefault("max_tokens", assistant.bundle.max_new_tokens)
        params.setdefault("temperature", 0.0)  # greedy, as the bundle was evaluated
        return params

    async def _prepare(self, model: str | None, messages: Sequence[dict], passages: int | None):
        assistant = self.get(model)
        question, history = split_conversation(messages, self.settings.history_messages)
        query = retrieval_query(messages)
        hits, ms, abstain = await self._retrieve(assistant, query, passages)
        if abstain:  # no prompt: the model is not asked
            return assistant, query, hits, ms, None
        given = prompt_passages(hits)
        if assistant.focus is not None and assistant.focus.enabled:  # a few ms of tokenizing: off the event loop
            given = await asyncio.get_running_loop().run_in_executor(self._retrieval_pool, assistant.focus.apply,
                                                                     query, given)
        prompt = build_messages(question, given, history)
        return assistant, query, hits, ms, prompt

    def queue_full(self) -> TooManyRequests | None:
        """The refusal a new answer gets now, or None while the bounded queue has room."""
        if self.pending < self.settings.max_pending:
            return None
        return TooManyRequests(f"The assistant is answering {self.pending} requests, as many as it queues; "
                               f"retry in {TooManyRequests.retry_after_s} s.")

    def _admit(self) -> None:
        """Take a place in the bounded queue, or refuse at once: past ``max_pending`` answers a new one would
        only wait behind them, so the client is told to come back instead (429 with Retry-After)."""
        if (full := self.queue_full()) is not None:
            raise full
        self.pending += 1

    async def answer(self, model: str | None, messages: Sequence[dict], params: dict | None = None,
                     passages: int | None = None) -> dict:
        """A whole answer: {text, finish_reason, usage, sources, query, retrieval_ms, abstained}."""
        self.get(model)
        self._admit()
        try:
            return await self._answer(model, messages, params, passages)
        except (UpstreamUnavailable, UpstreamError):
            self._probe = None  # the next /ready asks the engine again instead of repeating an old yes
            raise
        finally:
            self.pending -= 1

    async def _answer(self, model: str | None, messages: Sequence[dict], params: dict | None,
                      passages: int | None) -> dict:
        assistant, query, hits, ms, prompt = await self._prepare(model, messages, passages)
        if prompt is None:
            return {"text": REFUSAL, "finish_reason": "stop", "usage": Usage(), "sources": to_sources(hits),
                    "query": query, "retrieval_ms": round(ms, 2), "abstained": True}
        done = await self.upstream.complete(assistant.served.upstream_model, prompt,
                                            self._params(assistant, params))
        text = ground_citations(done.text, prompt_passages(hits)) if self.settings.ground_citations else done.text
        cited = parse_citations(text, len(hits))
        return {"text": text, "finish_reason": done.finish_reason, "usage": done.usage,
                "sources": to_sources(hits, cited), "query": query, "retrieval_ms": round(ms, 2),
                "abstained": False}

    async def answer_events(self, model: str | None, messages: Sequence[dict], params: dict | None = None,
                            passages: int | None = None) -> AsyncIterator[AnswerEvent]:
        """Stream an answer: a 'sources' event as soon as retrieval is done, 'delta' events, then 'done'
        (with the sources again, marked with whether the answer cited them). Where the abstention rule
        abstains, the one delta is the refusal sentence and the model is not asked. The answer holds a place in
        the bounded queue until its last event (or the client goes away)."""
        self.get(model)
        self._admit()
        try:
            async for event in self._answer_events(model, messages, params, passages):
                yield event
        except (UpstreamUnavailable, UpstreamError):
            self._probe = None
            raise
        finally:
            self.pending -= 1

    async def _answer_events(self, model: str | None, messages: Sequence[dict], params: dict | None,
                             passages: int | None) -> AsyncIterator[AnswerEvent]:
        assistant, query, hits, ms, prompt = await self._prepare(model, messages, passages)
        ms = round(ms, 2)
        yield AnswerEvent("sources", sources=to_sources(hits), query=query, retrieval_ms=ms)
        if prompt is None:
            yield AnswerEvent("delta", text=REFUSAL)
            yield AnswerEvent("done", text=REFUSAL, sources=to_sources(hits), query=query, retrieval_ms=ms,
                              finish_reason="stop", usage=Usage(), abstained=True)
            return
        text, finish, usage = "", None, None
        grounder = CitationGrounder(prompt_passages(hits)) if self.settings.ground_citations else None
        async for kind, value in self.upstream.stream(assistant.served.upstream_model, prompt,
                                                      self._params(assistant, params)):
            if kind == "delta":
                value = grounder.feed(value) if grounder else value
                if value:
                    text += value
                    yield AnswerEvent("delta", text=value)
            elif kind == "finish":
                finish = value
            elif kind == "usage":
                usage = value
        rest = grounder.finish() if grounder else ""
        if rest:
            text += rest
            yield AnswerEvent("delta", text=rest)
        cited = parse_citations(text, len(hits))
        yield AnswerEvent("done", text=text, sources=to_sources(hits, cited), query=query, retrieval_ms=ms,
                          finish_reason=finish or "stop", usage=usage)

    async def ready(self) -> tuple[bool, dict]:
        """Ready when every bundle's index is loaded and the model server generates (a one-token probe, its
        answer reused for ``ready_cache_s`` so that frequent health checks cost the engine nothing)."""
        indexes = {name: a.retriever.dense is not None and len(a.retriever.chunks) > 0
                   for name, a in self.assistants.items()}
        now = time.monotonic()
        if self._probe is None or now - self._probe[0] > self.settings.ready_cache_s:
            model = self.assistants[self.default_model].served.upstream_model
            self._probe = (time.monotonic(), *await self.upstream.check(model))
        _, upstream_ok, detail = self._probe
        ok = upstream_ok and all(indexes.values())
        return ok, {"ready": ok, "model_server": {"ok": upstream_ok, "detail": detail},
                    "indexes": {n: {"loaded": v, "chunks": len(self.assistants[n].retriever.chunks)}
                                for n, v in indexes.items()}}

    async def close(self) -> None:
        await self.upstream.close()
        self._retrieval_pool.shutdown(wait=False, cancel_futures=True)


def bundle_summary(bundle: Bundle) -> list[tuple[str, str]]:
    """(label, value) pairs for a header: the bundle and its headline metrics, whatever the builder recorded."""
    m = bundle.manifest
    rows = [("bundle", bundle.bundle_id), ("built", str(m.get("created_at", ""))[:16].replace("T", " "))]
    knowledge = m.get("knowledge", {})
    if knowledge.get("files") is not None:
        rows.append(("documents", str(len(knowledge["files"]))))
    if m.get("index", {}).get("chunks"):
        rows.append(("chunks", str(m["index"]["chunks"])))
    metrics = m.get("metrics", {})
    retrieval = metrics.get("retrieval", {})
    served = retrieval.get("served") or retrieval.get(str(retrieval.get("served_mode", "")))
    if isinstance(served, dict):
        mode = served.get("mode") or retrieval.get("served_mode") or m.get("retrieval", {}).get("mode", "")
        for key in ("recall@1", "recall@5", "mrr@10"):
            if isinstance(served.get(key), (int, float)):
                rows.append((f"{key} ({mode})" if mode else key, f"{served[key]:.2f}"))
    answers = metrics.get("answers", {})
    if isinstance(answers, dict):
        for label, value in _flat_numbers(answers):
            if any(t in label for t in ("f1", "exact", "rouge", "citation", "refus")) and len(rows) < 12:
                rows.append((f"answers {label}", f"{value:.2f}"))
    return rows


def _flat_numbers(d: dict, prefix: str = "") -> list[tuple[str, float]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.extend(_flat_numbers(v, f"{prefix}{k} "))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append((f"{prefix}{k}", float(v)))
    return out
