"""Training and evaluation data from the knowledge base.

- ``split_questions``: a deterministic train / held-out split of question/answer pairs (by a hash of the
  question), so a rebuild holds out the same questions.
- Embedder pairs (question or synthetic query, positive chunk, hard negatives) and retrieval-augmented chat
  examples for the LLM are made by ``make_embedder_pairs`` and ``make_chat_examples``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from builder.ingest import QAPair


def stable_fraction(key: str, seed: int = 0) -> float:
    """A number in [0, 1) fixed by the key and seed: the basis of every deterministic split."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_questions(pairs: Sequence[dict], holdout_fraction: float, seed: int = 0,
                    key: str = "question") -> tuple[list[dict], list[dict]]:
    train, held = [], []
    for p in pairs:
        (held if stable_fraction(str(p[key]), seed) < holdout_fraction else train).append(p)
    return train, held


def qa_to_dict(pair: QAPair) -> dict:
    return {"question": pair.question, "answer": pair.answer, "source": pair.source, "origin": pair.origin}


def read_questions(path: str | Path) -> list[dict]:
    """A question file: one {"question", "answer", "source"?} object per line. Bad lines raise with their number."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                q, a = str(obj["question"]).strip(), str(obj["answer"]).strip()
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: expected a JSON object with question and answer ({exc})") from None
            out.append({"question": q, "answer": a, "source": obj.get("source") or None,
                        "origin": f"{Path(path).name}:{n}"})
    return out
