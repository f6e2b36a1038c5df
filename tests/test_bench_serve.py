"""bench/serve.py runs on any bundle: one without test questions or section headings still gets questions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.docs_factory import reseal

REPO = Path(__file__).resolve().parent.parent


def _bench_serve():
    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_questions_for_a_bundle_without_questions_or_headings_come_from_its_documents(tiny_bundle_copy):
    from core.bundle import Bundle

    (tiny_bundle_copy / "eval" / "heldout.jsonl").unlink()
    chunks_file = tiny_bundle_copy / "index" / "chunks.jsonl"
    rows = [dict(json.loads(line), location="") for line in chunks_file.open()]
    chunks_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reseal(tiny_bundle_copy)
    qs = _bench_serve().questions_for(Bundle.load(tiny_bundle_copy), 7)
    assert len(qs) == 7 and all(q.startswith("What does ") for q in qs)
