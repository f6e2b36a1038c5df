"""The teacher: an OpenAI-compatible chat endpoint (``datagen.teacher_url``) that writes training questions.

The embedder pairs ask it for questions per chunk (``embedder_pairs.teacher_queries``) and the chat examples for
question/answer pairs (``chat_examples.teacher_qa_pairs``); both go through one ``Ask`` function, so a test or
another backend stands in for the endpoint in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Ask = Callable[..., str]  # ask(prompt, temperature=0.0, max_tokens=400) -> the reply's text


def client_ask(client: Any, model: str) -> Ask:
    """``ask`` over an OpenAI client (or anything with its ``chat.completions.create``)."""

    def ask(prompt: str, temperature: float = 0.0, max_tokens: int = 400) -> str:
        reply = client.chat.completions.create(model=model, temperature=temperature, max_tokens=max_tokens,
                                               messages=[{"role": "user", "content": prompt}])
        return reply.choices[0].message.content or ""
    return ask


def openai_teacher(base_url: str, model: str, timeout: float = 60.0) -> Ask:
    """``ask`` over the endpoint at ``base_url`` (one retry: a slow teacher costs examples, not the build)."""
    from openai import OpenAI

    return client_ask(OpenAI(base_url=base_url, api_key="not-needed", timeout=timeout, max_retries=1), model)
