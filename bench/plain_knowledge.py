"""The sample knowledge/ folder as a plain folder: its FAQ removed, built from the documents alone, scored on the
FAQ's questions (none of which reaches the build).

The second plain-folder case beside `bench/covidqa.py --no-questions`: a small mixed folder (Markdown, HTML, PDF,
DOCX, CSV, text) where COVID-QA is a hundred long scientific articles. Every FAQ question is a test question here;
the build chooses and gates on the questions it generates itself. Results: bench/results/knowledge-plain.json.

    .venv/bin/python bench/plain_knowledge.py --work /tmp/kp
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.covidqa import commit, machine  # after the path is set

FAQ_GLOB = "*.qa.jsonl"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(REPO / "bench" / "work" / "knowledge-plain"), help="scratch folder")
    ap.add_argument("--profile", default="cpu", help="build profile (default cpu)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override passed to the build (repeatable)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "knowledge-plain.json"), help="results JSON")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from builder.eval_report import format_report, run_eval
    from builder.pipeline import build
    from core.bundle import Bundle
    from core.config import load_config

    t0 = time.perf_counter()
    work = Path(args.work)
    folder = work / "knowledge"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(REPO / "knowledge", folder, ignore=shutil.ignore_patterns(FAQ_GLOB))
    questions = []
    for f in sorted((REPO / "knowledge").rglob(FAQ_GLOB)):
        questions += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    test = work / "faq_questions.jsonl"
    test.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
    print(f"knowledge/ without its FAQ: {sum(1 for p in folder.rglob('*') if p.is_file())} files; "
          f"{len(questions)} FAQ questions kept for the test", file=sys.stderr)

    bundle_path = build(load_config(args.profile, None, args.overrides), folder, work / "bundles")
    build_s = time.perf_counter() - t0
    report = run_eval(bundle_path, test, answers=True)
    manifest = Bundle.load(bundle_path).manifest
    results = {
        "retrieval": report["retrieval"], "answers": report.get("answers", {}),
        "questions": {"test": len(questions), "passed_to_the_build": 0},
        "generated_questions": manifest["data"].get("generated_questions", {}),
        "embedder": {k: manifest["models"]["embedder"].get(k) for k in ("finetuned", "decision", "gate")},
        "llm": {k: manifest["models"]["llm"].get(k) for k in ("decision", "gate_from")},
        "served": manifest.get("retrieval", {}), "abstention": manifest.get("abstention", {}).get("decision"),
        "selection": manifest.get("metrics", {}).get("selection", {}),
        "timing": {"build_s": round(build_s, 1), **manifest.get("timing", {})},
        "run": {"command": " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
                "commit": commit(), "profile": args.profile, "overrides": args.overrides,
                "machine": machine(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "wall_s": round(time.perf_counter() - t0, 1)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(format_report(report))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
