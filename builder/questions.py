"""Question/answer pairs as the build uses them: read from a question file, taken from ingested QA files, and
split train / held-out deterministically (by a hash of the question), so a rebuild holds out the same ones.

    python -c "from builder.questions import read_questions; print(len(read_questions('questions.jsonl')))"
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from builder.ingest import QAPair
from core.hashing import stable_fraction


def split_questions(pairs: Sequence[dict], holdout_fraction: float, seed: int = 0,
                    key: str = "question") -> tuple[list[dict], list[dict]]:
    """(train, held out): a pair is held out when the hash of its ``key`` falls below ``holdout_fraction``."""
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
