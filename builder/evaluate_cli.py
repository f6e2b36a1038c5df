"""`assistant eval BUNDLE [--questions FILE.jsonl] [--json]`: retrieval and answer metrics of a bundle.

    assistant eval bundles/latest --questions held_out.jsonl --json
"""

from __future__ import annotations

from pathlib import Path

from builder.datagen import read_questions
from serving.bundle import Bundle


def load_eval_questions(bundle: Bundle, questions_file: str | Path | None) -> list[dict]:
    if questions_file:
        return read_questions(questions_file)
    held = bundle.path / "eval" / "heldout.jsonl"
    return read_questions(held) if held.exists() and held.stat().st_size else []


def run_eval(bundle_path: str | Path, questions_file: str | Path | None = None, answers: bool = True,
             limit: int | None = None) -> dict:
    """{"bundle", "questions", "retrieval": {system: metrics}, "answers": {system: metrics}}."""
    from builder.evaluate import retrieval_report

    bundle = Bundle.load(bundle_path)
    questions = load_eval_questions(bundle, questions_file)
    if not questions:
        raise FileNotFoundError("no questions to evaluate: pass --questions FILE.jsonl (the bundle has no "
                                "held-out split)")
    report: dict = {"bundle": bundle.bundle_id, "questions": len(questions)}
    report["retrieval"] = retrieval_report(bundle, questions)
    if answers:
        try:
            from builder.answer_eval import answer_report
        except ImportError:
            answer_report = None
        if answer_report is not None:
            report["answers"] = answer_report(bundle, questions, limit=limit)
    return report


def format_report(report: dict) -> str:
    lines = [f"bundle {report['bundle']}: {report['questions']} questions"]
    for section in ("retrieval", "answers"):
        table = report.get(section)
        if not table:
            continue
        systems = [s for s, v in table.items() if isinstance(v, dict)]
        if not systems:
            continue
        keys = [k for k in table[systems[0]] if isinstance(table[systems[0]][k], (int, float))]
        lines.append("")
        lines.append(f"{section:<20}" + "".join(f"{k:>12}" for k in keys))
        for s in systems:
            lines.append(f"{s:<20}" + "".join(f"{table[s].get(k, float('nan')):>12.4f}" for k in keys))
    return "\n".join(lines)
