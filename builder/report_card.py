"""The report card of a bundle: one self-contained HTML page (eval/report.html, plots inlined) that says what the
fine-tunes changed, on which questions, and what was decided.

It shows base vs fine-tuned retrieval and answers on the test split with their intervals, the trivial
baselines beside the citation figures, the gate decisions and why, the embedder's fit on its training pairs
against its held-out pairs, the LoRA loss curve, recall@5 per document (where the assistant is weak), the
documents no training question points at, and five answers side by side. The build writes it into every
bundle; `assistant eval BUNDLE --report FILE` writes one for any bundle and question file.

    assistant eval bundles/latest --report /tmp/report.html
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

from core.bundle import LOSS_PLOT, PAIRS_FILE, Bundle, Chunk
from core.gold import GoldMatcher

ANSWER_KEYS = ("f1", "f1_ci", "exact_match", "citation_chunk_model", "citation_served", "refusal_unanswerable",
               "false_refusal", "abstained", "refusal_unanswerable_model", "f1_without_abstention")
RETRIEVAL_KEYS = ("recall@1", "recall@5", "recall@10", "mrr@10")
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#1b1f24;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.1em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .45em;text-align:right;font-size:.92em}
th:first-child,td:first-child{text-align:left}.note{color:#555;font-size:.9em}.decision{background:#f5f7fa;
padding:.5em .8em;border-left:3px solid #1f4e79}img{max-width:100%}.ex td{text-align:left;vertical-align:top}"""


def _fmt(v) -> str:
    if isinstance(v, list) and len(v) == 2:
        return f"[{_fmt(v[0])}, {_fmt(v[1])}]"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v)) if v is not None else "–"


def _table(rows: dict, keys: Sequence[str]) -> str:
    keys = [k for k in keys if any(isinstance(r, dict) and k in r for r in rows.values())]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in keys)
                   + "</tr>" for name, r in rows.items() if isinstance(r, dict))
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def per_document_recall(retriever, questions: Sequence[dict], k: int = 5) -> dict[str, dict]:
    """{document: {"questions", "recall@5"}} for the served retriever: which documents it finds, which not."""
    matcher = GoldMatcher(retriever.chunks)
    ranked = retriever.rank([q["question"] for q in questions], k) if questions else []
    out: dict[str, dict] = {}
    for q, r in zip(questions, ranked):
        relevant = matcher.relevant(q)
        if not relevant:
            continue
        doc = q.get("source") or retriever.chunks[min(relevant)].source
        row = out.setdefault(doc, {"questions": 0, "found": 0})
        row["questions"] += 1
        row["found"] += any(p in relevant for p, _ in r[:k])
    return {d: {"questions": v["questions"], f"recall@{k}": round(v["found"] / v["questions"], 3)}
            for d, v in sorted(out.items(), key=lambda kv: kv[1]["found"] / kv[1]["questions"])}


def uncovered_documents(chunks: Sequence[Chunk], pairs_file: Path) -> list[str]:
    """Documents that no real training question (FAQ or --questions) points at."""
    ids = {c.chunk_id: c.source for c in chunks}
    asked = set()
    if pairs_file.is_file():
        for line in pairs_file.open(encoding="utf-8"):
            row = json.loads(line)
            if row.get("split") == "train" and row.get("kind") == "question":
                asked.add(ids.get(row.get("positive_chunk_id"), ""))
    return sorted({c.source for c in chunks} - asked)


def _recall_plot(per_doc: dict[str, dict]) -> str:
    if not per_doc:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = list(per_doc)[:30]  # the weakest first
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(docs) + 1), dpi=100)
    ax.barh(range(len(docs)), [per_doc[d]["recall@5"] for d in docs], color="#1f4e79")
    ax.set_yticks(range(len(docs)), [f"{d} ({per_doc[d]['questions']})" for d in docs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("recall@5 of the served retriever (test questions per document)")
    out = _png(fig)
    plt.close(fig)
    return out


def render(card: dict) -> str:
    """The page for a card: {"title", "facts": [(label, value)], "retrieval", "answers", "decisions",
    "embedder_fit", "loss_png", "per_document", "uncovered", "examples"}."""
    parts = [f"<h1>{html.escape(card['title'])}</h1>",
             "<p>" + " · ".join(f"<b>{html.escape(k)}</b> {html.escape(str(v))}" for k, v in card["facts"]) + "</p>"]
    parts.append("<h2>Decisions</h2>" + "".join(f'<p class="decision"><b>{html.escape(k)}</b>: {html.escape(v)}</p>'
                                                   for k, v in card["decisions"].items()))
    if card.get("retrieval"):
        parts.append(f"<h2>Retrieval ({html.escape(card.get('retrieval_split', 'test split'))})</h2>"
                     + _table(card["retrieval"], RETRIEVAL_KEYS))
    if card.get("answers"):
        parts.append(f"<h2>Answers ({html.escape(card.get('answers_split', 'test split'))})</h2>"
                     + _table(card["answers"], ANSWER_KEYS)
                     + '<p class="note">f1_ci: 95% bootstrap interval over questions. citation_chunk_model: the '
                       "model's own first marker points at a passage that answers the question; citation_served: "
                       "the same after the gateway grounds the markers (it adds one where the model wrote none). "
                       "always_first / top_passage: citing [1], or the passage sharing most words with the "
                       "question, with no model at all. refusal_unanswerable / false_refusal: as served, the "
                       "abstention rule first (abstained: the share of answerable questions it refused), then the "
                       "model (refusal_unanswerable_model: the model's own refusals).</p>")
        by_kind = {s: v["refusal_by_kind"] for s, v in card["answers"].items()
                   if isinstance(v, dict) and isinstance(v.get("refusal_by_kind"), dict)}
        if by_kind:
            kinds = list(dict.fromkeys(k for v in by_kind.values() for k in v))
            parts.append("<p>Refusal on unanswerable questions by kind (document_left_out: asked as if the "
                         "documents that answer them were not indexed; off_topic; not_indexed: about documents "
                         "the bundle was built without):</p>" + _table(by_kind, kinds))
        paired = card["answers"].get("finetuned_vs_base")
        if isinstance(paired, dict) and "ci" in paired:
            parts.append(f"<p>Fine-tuned minus base F1, paired over {paired.get('n')} questions: "
                         f"{_fmt(paired.get('diff'))}, 95% interval {_fmt(paired['ci'])}.</p>")
    fit = card.get("answers", {}).get("train_fit")
    if isinstance(fit, dict) and fit:
        parts.append("<h2>LLM: F1 on training questions against test questions</h2>"
                     + _table(fit, ("f1_train", "f1_test", "train_questions"))
                     + '<p class="note">Both before abstention. A fine-tune far better on the questions it was '
                       "trained on than on test ones has learned its questions rather than the task.</p>")
    if card.get("embedder_fit"):
        parts.append("<h2>Embedder: training pairs against held-out pairs</h2>" + _table(card["embedder_fit"],
                                                                                        RETRIEVAL_KEYS)
                     + '<p class="note">A fine-tune far better on its training pairs than on held-out ones has '
                       "learned its data rather than the task.</p>")
    if card.get("loss_png"):
        parts.append("<h2>LoRA training loss</h2>" + card["loss_png"])
    if card.get("per_document"):
        parts.append("<h2>Where retrieval is weak: recall@5 per document</h2>" + card.get("per_document_plot", ""))
    if card.get("uncovered") is not None:
        shown = ", ".join(html.escape(d) for d in card["uncovered"][:60]) or "none"
        parts.append(f"<h2>Training coverage</h2><p>{len(card['uncovered'])} of {card.get('documents', '?')} "
                     f"documents have no training question pointing at them: {shown}</p>")
    gen = card.get("generated") or {}
    if gen.get("sample"):
        rows = "".join(f"<tr><td>{html.escape(g['question'])}</td><td>{html.escape(t['question'] if t else '')}</td>"
                       f"<td>{html.escape(g['source'])}</td></tr>"
                       for g, t in zip(gen["sample"], list(gen.get("templates", [])) + [None] * len(gen["sample"])))
        counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in gen.items() if isinstance(v, (int, str))
                           and k not in ("sample", "templates"))
        parts.append("<h2>Generated training questions</h2>"
                     f"<p>{html.escape(counts)}</p><table class=\"ex\"><tr><th>generated (kept)</th>"
                     f"<th>template question they replace</th><th>document</th></tr>{rows}</table>"
                     '<p class="note">Written by the writer from one sentence of a chunk (the answer), kept when '
                     "the chunk comes back in the round trip; the template questions are what the build trained "
                     "on without them.</p>")
    if card.get("examples"):
        systems = [s for s in ("base", "finetuned", "base_no_retrieval") if any(s in e for e in card["examples"])]
        rows = "".join("<tr><td>" + html.escape(e["question"]) + "</td><td>" + html.escape(str(e.get("gold", "")))
                       + "</td>" + "".join(f"<td>{html.escape(str(e.get(s, '')))}</td>" for s in systems) + "</tr>"
                       for e in card["examples"][:5])
        parts.append("<h2>Five answers side by side</h2><table class=\"ex\"><tr><th>question</th><th>gold</th>"
                     + "".join(f"<th>{s}</th>" for s in systems) + f"</tr>{rows}</table>")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(card['title'])}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")


def bundle_card(bundle_dir: Path, manifest: dict, retriever, test_questions: Sequence[dict],
                report: dict | None = None) -> dict:
    """The card of a bundle from its manifest (the build's own test figures), or from an `assistant eval`
    ``report`` on other questions; ``retriever`` is the bundle's served one."""
    metrics = manifest.get("metrics", {})
    models = manifest.get("models", {})
    emb, llm = models.get("embedder", {}), models.get("llm", {})
    # The bundle's embedder is the base one when its gate kept the fine-tune out: the label says which.
    served_embedder = ("fine-tuned embedder (dense)" if emb.get("finetuned")
                       else "base embedder, kept by the gate (dense)")
    names = {"dense": served_embedder, "bm25": "BM25", "hybrid": "hybrid (the chosen fusion)",
             "base_dense": "base embedder (dense)"}
    retrieval = (report or {}).get("retrieval") or {names.get(k, k): v for k, v in metrics.get("retrieval", {}).items()
                                                      if isinstance(v, dict) and k != "served"}
    answers = (report or {}).get("answers") or metrics.get("answers", {})
    examples = answers.get("examples") or llm.get("examples") or []
    heldout = emb.get("heldout", {}).get("all", {})
    fit = {f"{who} on held-out pairs": heldout[who] for who in ("base", "finetuned") if who in heldout}
    if emb.get("train_fit"):
        fit["fine-tuned on its training pairs"] = emb["train_fit"]
    per_doc = per_document_recall(retriever, test_questions) if test_questions else {}
    loss = Path(bundle_dir) / LOSS_PLOT
    data = manifest.get("data", {})
    splits = " / ".join(str(data.get(k, "?")) for k in ("train_questions", "dev_questions", "test_questions"))
    served = f"{manifest.get('retrieval', {}).get('mode')} {manifest.get('retrieval', {}).get('fusion')}"
    return {
        "title": f"Report card: {manifest.get('bundle_id', Path(bundle_dir).name)}",
        "facts": [("built", str(manifest.get("created_at", ""))[:16]), ("profile", manifest.get("profile", "")),
                  ("documents", manifest.get("knowledge", {}).get("documents", "")),
                  ("chunks", data.get("chunks", "")),
                  ("train / dev / test questions", splits),
                  ("served retrieval", served)],
        "decisions": {"embedder": emb.get("decision", "–"), "LLM adapter": llm.get("decision", "–"),
                      "abstention": manifest.get("abstention", {}).get("decision", "–"),
                      **{f"chosen on: {k}": str(v) for k, v in metrics.get("selection", {}).items()}},
        "retrieval": retrieval, "retrieval_split": "questions given to assistant eval" if report else
        metrics.get("retrieval", {}).get("split", "test"),
        "answers": {k: v for k, v in answers.items() if k != "examples"},
        "answers_split": "questions given to assistant eval" if report else answers.get("split", "test split"),
        "embedder_fit": fit,
        "loss_png": (f'<img alt="loss curve" src="data:image/png;base64,'
                     f'{base64.b64encode(loss.read_bytes()).decode()}">') if loss.is_file() else "",
        "per_document": per_doc, "per_document_plot": _recall_plot(per_doc),
        "uncovered": uncovered_documents(retriever.chunks, Path(bundle_dir) / PAIRS_FILE),
        "documents": len({c.source for c in retriever.chunks}),
        "examples": examples,
        "generated": data.get("generated_questions") or {},
    }


def write_report(bundle: Bundle, out: Path, questions: Sequence[dict], report: dict | None = None) -> Path:
    """Write the card of a finished bundle (for `assistant eval --report`)."""
    from core.retrieval import Retriever

    card = bundle_card(bundle.path, bundle.manifest, Retriever.load(bundle), questions, report)
    Path(out).write_text(render(card), encoding="utf-8")
    return Path(out)
