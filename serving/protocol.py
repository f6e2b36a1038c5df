"""Request and response models of the gateway: OpenAI's chat-completions shapes plus `sources`.

Unknown request fields are accepted and ignored, as OpenAI-compatible servers do, so clients written for
OpenAI work unchanged. Errors use OpenAI's envelope: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; content parts other than text (images, audio) are dropped."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type", "text") == "text")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Extensions: passages to retrieve, exactly (default: the bundle's top_k less those trailing by more than its passage_gap), and vLLM sampling extras passed through.
    passages: int | None = Field(default=None, ge=1, le=20)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    repetition_penalty: float | None = None

    def sampling_params(self) -> dict[str, Any]:
        """Parameters forwarded to the model server (only those the client set)."""
        out: dict[str, Any] = {}
        limit = self.max_completion_tokens or self.max_tokens
        if limit is not None:
            out["max_tokens"] = limit
        for key in ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        extra = {k: getattr(self, k) for k in ("min_tokens", "ignore_eos", "repetition_penalty")
                 if getattr(self, k) is not None}
        if extra:
            out["extra_body"] = extra
        return out


class Source(BaseModel):
    """A retrieved passage given to the model: where it comes from and what it says."""

    rank: int
    source: str  # file path relative to the knowledge folder
    location: str  # page, heading path or row
    title: str
    chunk_id: str
    score: float
    snippet: str  # the start of the passage, whitespace collapsed
    text: str  # the whole passage as the model saw it
    cited: bool = False  # the answer cites it as [rank]


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str | None = "stop"


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    sources: list[Source]
    retrieval_query: str  # what was searched (the latest turn, with the previous one when it is a follow-up)
    retrieval_ms: float
    abstained: bool = False  # the passages were too weak to answer from: the refusal, without asking the model


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    sources: list[Source] | None = None  # on the chunk that carries finish_reason
    retrieval_query: str | None = None
    retrieval_ms: float | None = None
    abstained: bool | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "domain-assistant"
    bundle_id: str
    weights: str  # merged, adapter or base


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    query: str = Field(min_length=1)
    model: str | None = None  # default: the first served bundle
    k: int | None = Field(default=None, ge=1, le=50)


class RetrieveResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    query: str
    data: list[Source]
    retrieval_ms: float


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
