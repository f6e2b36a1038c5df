"""What `assistant eval BUNDLE [--questions FILE.jsonl] [--json]` reports: retrieval and answer metrics of a
bundle on a question file (by default the bundle's held-out split).

    assistant eval bundles/latest --questions held_out.jsonl --json
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from builder.evaluate_answers import answer_report
from builder.evaluate_retrieval import retrieval_report
from builder.questions import read_questions
from core.bundle import HELDOUT_FILE, Bundle


def load_eval_questions(bundle: Bundle, questions_file: str | Path | None) -> list[dict]:
    if questions_file:
        return read_questions(questions_file)
    held = bundle.file(HELDOUT_FILE)
    return read_questions(held) if held.exists() and held.stat().st_size else []


def read_unanswerable(path: str | Path) -> list[str]:
    """Questions the knowledge base cannot answer: a .jsonl file of {"question": ...} rows, or one per line."""
    import json

    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                line = str(json.loads(line)["question"]).strip()
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: expected a JSON object with a \"question\"") from None
        if line:
            out.append(line)
    return out


def run_eval(bundle_path: str | Path, questions_file: str | Path | None = None, answers: bool = True,
             limit: int | None = None, unanswerable: Sequence[str] = ()) -> dict:
    """{"bundle", "questions", "retrieval": {system: metrics}, "answers": {system: metrics}}; ``unanswerable``:
    questions about documents the bundle was built without, scored as refusals (kind 'not_indexed')."""
    bundle = Bundle.load(bundle_path)
    questions = load_eval_questions(bundle, questions_file)
    if not questions:
        raise FileNotFoundError("no questions to evaluate: pass --questions FILE.jsonl (the bundle has no "
                                "held-out split)")
    report: dict = {"bundle": bundle.bundle_id, "questions": len(questions)}
    report["retrieval"] = retrieval_report(bundle, questions)
    if answers:
        report["answers"] = answer_report(bundle, questions, limit=limit, not_indexed=unanswerable)
    return report


def format_report(report: dict) -> str:
    lines = [f"bundle {report['bundle']}: {report['questions']} questions"]
    for section in ("retrieval", "answers"):
        table = report.get(section)
        if not table:
            continue
        systems = [s for s, v in table.items() if isinstance(v, dict)
                   and any(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values())]
        if not systems:
            continue
        keys = list(dict.fromkeys(k for s in systems for k, v in table[s].items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)))
        width = {k: max(10, len(k)) + 2 for k in keys}
        lines.append("")
        lines.append(f"{section:<20}" + "".join(f"{k:>{width[k]}}" for k in keys))
        for s in systems:
            lines.append(f"{s:<20}" + "".join(f"{table[s].get(k, float('nan')):>{width[k]}.4f}" for k in keys))
    return "\n".join(lines)
