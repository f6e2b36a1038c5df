"""Question/answer pairs as the build uses them: read from a question file, taken from ingested QA files, and
split train / dev / test deterministically by a hash of the normalized question, so a rebuild holds out the same
ones and two copies of a question (whatever their case, spacing or punctuation) always fall on one side.

    python -c "from builder.questions import read_questions; print(len(read_questions('questions.jsonl')))"
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from builder.ingest import QAPair
from core.hashing import stable_fraction
from core.text import words


def split_key(question: str) -> str:
    """What decides a question's side: its words, lower-cased, without punctuation or extra spaces."""
    return " ".join(words(question))


def split_questions(pairs: Sequence[dict], holdout_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held out): a pair is held out when the hash of its normalized question falls below
    ``holdout_fraction``."""
    train, held = [], []
    for p in pairs:
        (held if stable_fraction(split_key(p["question"]), seed) < holdout_fraction else train).append(p)
    return train, held


def split_train_dev_test(pairs: Sequence[dict], dev_fraction: float, test_fraction: float,
                         seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, dev, test) by the hash of the normalized question: below ``test_fraction`` test, then
    ``dev_fraction`` more dev, the rest train. Dev chooses (settings, gates); test is only scored."""
    train, dev, test = [], [], []
    for p in pairs:
        f = stable_fraction(split_key(p["question"]), seed)
        (test if f < test_fraction else dev if f < test_fraction + dev_fraction else train).append(p)
    return train, dev, test


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
