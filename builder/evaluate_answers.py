"""Answer quality of a bundle: the base LLM without retrieval, with retrieval, and the fine-tuned LLM with
retrieval, on held-out questions, scored against their gold answers.

For each question the passages come from the bundle's retriever in the mode and with the ``top_k`` its manifest
names, and the prompt is ``core.prompting.build_messages``: what is measured is what is served.

Metrics per system (``answer_report`` returns ``{system: {metric: float}}``, primary metric ``f1``):

- ``exact_match``, ``f1`` (SQuAD token F1), ``rouge_l``: against the gold answer, citation markers removed;
- ``f1_ci``: the 95% bootstrap interval of the mean F1;
- ``citation_chunk_model``: share of answerable questions whose raw answer (the model's own markers) cites a
  passage ([n]) whose first cited passage answers the question at chunk level: a chunk the gold matcher
  (``core.gold``) names, or one holding the gold answer. An answer that cites nothing counts as wrong.
  ``citation_served`` scores the same on the answer as served, its markers grounded (``core.citations``), which
  adds a marker to an answer without one; ``always_first`` and ``top_passage`` are what citing [1], or the
  passage sharing most words with the question, would score without any model;
- ``refusal_unanswerable``: share of unanswerable cases answered with the refusal sentence, as served (the
  bundle's abstention rule first, core/abstention.py, then the model); ``refusal_unanswerable_model`` the model's
  own refusals; ``refusal_by_kind`` per kind. The cases are asked the way they occur in use and retrieved by
  the system itself (builder/abstention.py): (a) ``document_left_out``: a quarter of the scored questions (at
  most 50, chosen by a hash of the question) asked as if the documents answering them were not in the index;
  (b) ``off_topic``: the test half of builder.abstention's off-topic questions; (c) ``not_indexed``: questions
  the caller has about documents the bundle was built without (bench/covidqa.py leaves some articles out);
- ``false_refusal``: share of answerable questions refused as served; ``abstained`` the share the rule
  refused; ``f1_without_abstention`` the F1 had the model answered every question;
- ``tokens_per_s``: generated tokens per second of generation (engine start-up excluded).

The scored questions are a deterministic subset (``eval.max_answer_questions``, or ``--limit``) chosen by a hash
of the question text. Generation uses vLLM's offline engine in a child process (``core.vllm_engine``;
``eval.generation_engine``: 'vllm', 'hf' or 'auto' = vLLM where it imports, transformers otherwise or when vLLM
fails). The fine-tuned system runs on merged weights where the bundle has them; on a CPU without them, the
adapter is merged into a temporary folder first, since vLLM's LoRA path is several times slower there.

    assistant eval bundles/latest --limit 50
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import string
import tempfile
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from builder.abstention import left_out, off_topic
from builder.stats import bootstrap_ci, paired_bootstrap
from core.abstention import Abstainer, AbstentionRule
from core.bundle import ANSWERS_FILE, Bundle, Chunk
from core.citations import ground_citations
from core.config import BuildConfig, ServeConfig
from core.gold import GoldMatcher
from core.hashing import stable_fraction
from core.hf_engine import generate_batches, load_tokenizer, merge_adapter
from core.log import say
from core.prompting import REFUSAL, build_messages, is_refusal, parse_citations
from core.retrieval import Lookup
from core.text import content_words, normalize
from core.vllm_engine import generate_offline

SYSTEMS = ("base_no_retrieval", "base", "finetuned")
UNANSWERABLE_SHARE, UNANSWERABLE_MAX = 0.25, 50

Log = Callable[[str], None]


def _squad_normalize(text: str) -> str:
    text = text.lower()
    text = re.sub(r"\[\d+\]", " ", text)  # citation markers are not part of the answer
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(_squad_normalize(prediction) == _squad_normalize(gold))


def token_f1(prediction: str, gold: str) -> float:
    p, g = _squad_normalize(prediction).split(), _squad_normalize(gold).split()
    if not p or not g:
        return float(p == g)
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F-measure over normalized tokens (longest common subsequence)."""
    p, g = _squad_normalize(prediction).split(), _squad_normalize(gold).split()
    if not p or not g:
        return 0.0
    prev = [0] * (len(g) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(g, start=1):
            cur.append(prev[j - 1] + 1 if a == b else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------- questions

def select_questions(questions: Sequence[dict], limit: int | None) -> list[dict]:
    """A deterministic subset: the ``limit`` questions with the smallest hash of their text (all if no limit)."""
    ordered = sorted(questions, key=lambda q: stable_fraction(q["question"], 7))
    return list(ordered if not limit or limit <= 0 else ordered[:limit])


def question_digest(questions: Sequence[dict], extra: dict) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for q in questions:
        h.update(f"{q['question']}\0{q['answer']}\0{q.get('source') or ''}\n".encode())
    return h.hexdigest()[:16]


def _passages(chunks: Sequence[Chunk], positions: Sequence[int]) -> list[dict]:
    return [{"text": chunks[i].text, "source": chunks[i].source, "location": chunks[i].location,
             "chunk_id": chunks[i].chunk_id} for i in positions]


def retrieve_contexts(retriever, questions: Sequence[str], top_k: int,
                      exclude: Sequence[Collection[int]] | None = None) -> tuple[list[list[dict]], list[Lookup]]:
    """(passages, lookup) for each question as serving gives them to the LLM (the retriever's own mode and passage
    gap); ``exclude``: chunk positions each question is asked without (see builder.abstention)."""
    contexts: list[list[dict]] = []
    lookups: list[Lookup] = []
    for start in range(0, len(questions), 64):
        part = retriever.lookup(list(questions[start:start + 64]), top_k,
                                exclude=exclude[start:start + 64] if exclude else None)
        lookups.extend(part)
        contexts.extend(_passages(retriever.chunks, [i for i, _ in lk.ranked]) for lk in part)
    return contexts, lookups


def unanswerable_cases(retriever, questions: Sequence[dict], top_k: int, not_indexed: Sequence[str] = ()
                       ) -> list[tuple[str, list[dict], str, Lookup]]:
    """(question, passages, kind, lookup) of the unanswerable cases, each retrieved by the system itself; see the
    module docstring."""
    n = min(UNANSWERABLE_MAX, max(1, int(len(questions) * UNANSWERABLE_SHARE))) if questions else 0
    picked = sorted(questions, key=lambda q: stable_fraction(q["question"], 11))[:n]
    keep = left_out(retriever, picked)
    groups = [("document_left_out", [q["question"] for q, _ in keep], [e for _, e in keep]),
              ("off_topic", off_topic("test"), None), ("not_indexed", list(not_indexed), None)]
    cases: list[tuple[str, list[dict], str, Lookup]] = []
    for kind, texts, excl in groups:
        if texts:
            contexts, lookups = retrieve_contexts(retriever, texts, top_k, excl)
            cases += [(t, c, kind, lk) for t, c, lk in zip(texts, contexts, lookups)]
    return cases


def cites_gold(answer: str, passages: Sequence[dict], question: dict, gold_ids: Collection[str] = ()) -> bool:
    """Whether the first passage the answer cites ([n]) is a chunk that answers the question: one of
    ``gold_ids`` (core.gold), or a passage holding the gold answer. Chunk level: another passage of the right
    document does not count. An answer that cites nothing (or no passage it was given) is wrong."""
    cited = parse_citations(answer, len(passages))
    return bool(cited) and _is_gold(passages[cited[0] - 1], question, gold_ids)


def _is_gold(passage: dict, question: dict, gold_ids: Collection[str]) -> bool:
    return passage.get("chunk_id") in gold_ids or normalize(question["answer"]) in normalize(passage["text"])


def _top_overlap(question: str, passages: Sequence[dict]) -> int:
    """The passage sharing the most content words with the question (the earlier on ties), 0-based."""
    want = content_words(question)
    return max(range(len(passages)), key=lambda j: (len(want & content_words(passages[j]["text"])), -j))


def citation_baselines(questions: Sequence[dict], contexts: Sequence[Sequence[dict]],
                       gold: Sequence[Collection[str]]) -> dict[str, dict[str, float]]:
    """What citing needs no model to score: always citing [1] (the retriever's best passage), and citing the
    passage that shares the most words with the question. Scored like ``citation_chunk_model``."""
    n = max(1, len(questions))
    first = sum(bool(c) and _is_gold(c[0], q, g) for q, c, g in zip(questions, contexts, gold)) / n
    top = sum(bool(c) and _is_gold(c[_top_overlap(q["question"], c)], q, g)
              for q, c, g in zip(questions, contexts, gold)) / n
    return {"always_first": {"citation_chunk_model": round(first, 4), "citation_served": round(first, 4)},
            "top_passage": {"citation_chunk_model": round(top, 4), "citation_served": round(top, 4)}}


def served(answers: Sequence[str], abstained: Sequence[bool] | None) -> list[str]:
    """The answers as the gateway gives them: the refusal sentence where the abstention rule abstained."""
    return [REFUSAL if a else t for t, a in zip(answers, abstained)] if abstained is not None else list(answers)


def score(answers: Sequence[str], questions: Sequence[dict], contexts: Sequence[Sequence[dict]] | None,
          unanswerable: Sequence[str] | None, gold: Sequence[Collection[str]] | None = None,
          abstained: Sequence[bool] | None = None, unanswerable_abstained: Sequence[bool] | None = None,
          unanswerable_kinds: Sequence[str] | None = None) -> dict:
    """Metrics of one system: its raw answers to ``questions`` (with ``contexts`` for citations, None without
    retrieval; ``gold``: each question's answering chunk ids) and, where given, to the unanswerable cases
    (``unanswerable_kinds`` names each case's kind). ``abstained`` / ``unanswerable_abstained``: where the
    abstention rule answered with the refusal instead. F1, exact match, ROUGE-L and refusals are scored on the
    answers as served; ``citation_chunk_model`` on the model's raw output. ``f1_ci`` is the 95% bootstrap
    interval of the mean F1; ``_f1`` the per-question F1, for paired comparisons (the caller removes it before
    writing a report)."""
    n = max(1, len(questions))
    given = served(answers, abstained)
    f1s = [token_f1(a, q["answer"]) for a, q in zip(given, questions)]
    out: dict = {"exact_match": sum(exact_match(a, q["answer"]) for a, q in zip(given, questions)) / n,
                 "f1": sum(f1s) / n,
                 "rouge_l": sum(rouge_l(a, q["answer"]) for a, q in zip(given, questions)) / n}
    if abstained is not None:
        out["f1_without_abstention"] = sum(token_f1(a, q["answer"]) for a, q in zip(answers, questions)) / n
        out["abstained"] = sum(abstained) / n
    if contexts is not None:
        gold = gold if gold is not None else [()] * len(questions)
        # The model's own markers on its raw output; beside it, the answer as served: the refusal where the
        # rule abstained, else the markers grounded by the gateway (core/citations.py), which also adds one to
        # an answer that has none.
        out["citation_chunk_model"] = sum(cites_gold(a, c, q, g) for a, c, q, g in
                                          zip(answers, contexts, questions, gold)) / n
        shown = served([ground_citations(a, c) for a, c in zip(answers, contexts)], abstained)
        out["citation_served"] = sum(cites_gold(a, c, q, g) for a, c, q, g in
                                     zip(shown, contexts, questions, gold)) / n
        out["false_refusal"] = sum(is_refusal(a) for a in given) / n
    if unanswerable is not None:
        m = max(1, len(unanswerable))
        refused = [is_refusal(a) for a in served(unanswerable, unanswerable_abstained)]
        out["refusal_unanswerable"] = sum(refused) / m
        out["refusal_unanswerable_model"] = sum(is_refusal(a) for a in unanswerable) / m
    out = {k: round(v, 4) for k, v in out.items()}
    if unanswerable is not None and unanswerable_kinds is not None:
        kinds = dict.fromkeys(unanswerable_kinds)
        out["refusal_by_kind"] = {
            k: round(sum(r for r, kk in zip(refused, unanswerable_kinds) if kk == k)
                     / sum(kk == k for kk in unanswerable_kinds), 4) for k in kinds}
    out["f1_ci"] = bootstrap_ci(f1s)
    out["_f1"] = f1s
    return out


# ----------------------------------------------------------------------------------------------- generation

def _prompt_len(tok, convs: Sequence[list[dict]]) -> int:
    lens = [len(tok(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]) for c in convs]
    return max(lens, default=0)


def uses_vllm(engine: str | None) -> bool:
    """Whether answers are generated by vLLM under eval.generation_engine (before any fallback)."""
    engine = (engine or "auto").lower()
    return engine == "vllm" or (engine == "auto" and importlib.util.find_spec("vllm") is not None)


def generate_answers(engine: str, model: str, batches: dict[str, list[list[dict]]], max_new_tokens: int,
                     serve_cfg: ServeConfig, adapter: str | None = None, log: Log = say,
                     lora_batches: Sequence[str] | None = None, eager: bool | None = None) -> tuple[dict[str, dict], str]:
    """Answers for every batch with one model; returns (results, engine actually used)."""
    engine = (engine or "auto").lower()
    if uses_vllm(engine):
        tok = load_tokenizer(adapter or model)
        need = _prompt_len(tok, [c for convs in batches.values() for c in convs]) + max_new_tokens + 8
        max_len = max(int(serve_cfg.max_model_len), need)
        try:
            return generate_offline(model, batches, max_new_tokens, max_len, serve_cfg, adapter,
                                    lora_batches=lora_batches, eager=eager), "vllm"
        except Exception as exc:
            if engine == "vllm":
                raise
            log(f"    vLLM failed, generating with transformers instead: {str(exc)[-400:]}")
    return generate_batches(model, batches, max_new_tokens, adapter, lora_batches=lora_batches), "hf"


# ----------------------------------------------------------------------------------------------- report

def evaluate_answers(retriever, questions: Sequence[dict], top_k: int, base: str, cfg, adapter: str | None = None,
                     merged: str | None = None, systems: Sequence[str] = SYSTEMS, log: Log = say,
                     merged_w8a8: str | None = None, focus=None, abstention: AbstentionRule | None = None,
                     not_indexed: Sequence[str] = (), fit_questions: Sequence[dict] = ()) -> dict:
    """{system: metrics} for the given (already selected) questions; see the module docstring. The fine-tuned
    answers come from ``merged_w8a8`` when given and vLLM generates (what vLLM serves on the CPU), else from
    ``merged``, else from ``adapter``. ``focus`` (core.focus.PassageFocus) cuts the passages in the prompts
    as serving does; citations are scored against the whole chunks, which is what the user is shown.
    ``abstention`` is the bundle's rule (core.abstention), applied as the gateway applies it; ``not_indexed``:
    questions about documents the bundle was built without, asked as unanswerable cases. ``fit_questions``:
    questions both models were trained or tuned on, whose F1 goes beside the test F1 under ``train_fit`` (a
    fine-tune far better on them than on test has learned its questions rather than the task)."""
    engine = cfg.eval.generation_engine
    max_new = cfg.llm.max_new_tokens
    eager = {"yes": True, "no": False}.get(str(cfg.eval.vllm_eager).lower())  # auto: None, eager on the CPU
    contexts, lookups = retrieve_contexts(retriever, [q["question"] for q in questions], top_k)
    matcher = GoldMatcher(retriever.chunks)
    gold = [{retriever.chunks[i].chunk_id for i in matcher.gold(q)} for q in questions]
    unans = unanswerable_cases(retriever, questions, top_k, not_indexed)
    abstainer = Abstainer(retriever, abstention)
    rule = {"answerable": abstainer.decide_all([q["question"] for q in questions], lookups),
            "unanswerable": abstainer.decide_all([u[0] for u in unans], [u[3] for u in unans])
            } if abstention is not None else None

    def given(question: str, passages: list[dict]) -> list[dict]:
        return focus.apply(question, passages) if focus is not None else passages

    rag = [build_messages(q["question"], given(q["question"], c)) for q, c in zip(questions, contexts)]
    rag_unans = [build_messages(q, given(q, c)) for q, c, _, _ in unans]
    plain = [[{"role": "user", "content": q["question"]}] for q in questions]
    fit_contexts, _ = retrieve_contexts(retriever, [q["question"] for q in fit_questions], top_k)
    rag_fit = [build_messages(q["question"], given(q["question"], c)) for q, c in zip(fit_questions, fit_contexts)]
    report: dict = {}
    batches: dict[str, list] = {}
    if "base_no_retrieval" in systems:
        batches["base_no_retrieval"] = plain
    if "base" in systems:
        batches.update(base=rag, base_unanswerable=rag_unans, **({"base_fit": rag_fit} if rag_fit else {}))
    tuned = {"finetuned": rag, "finetuned_unanswerable": rag_unans,
             **({"finetuned_fit": rag_fit} if rag_fit else {})} if "finetuned" in systems and (
        adapter or merged) else {}
    # The fine-tuned answers come from merged weights (a second engine) where the bundle has them or vLLM runs
    # on the CPU (merged into a temporary folder: LoRA costs ~3.4x there); else through the adapter, in the
    # same engine as the base answers.
    import torch

    via_lora = bool(tuned) and not merged and (torch.cuda.is_available() or engine == "hf"
                                                or importlib.util.find_spec("vllm") is None)
    results: dict[str, dict] = {}
    used = {}
    if via_lora:
        n = sum(map(len, batches.values())) + sum(map(len, tuned.values()))
        log(f"    generating {n} answers with the base model and its adapter")
        res, eng = generate_answers(engine, base, {**batches, **tuned}, max_new, cfg.serve, adapter=adapter,
                                    log=log, lora_batches=list(tuned), eager=eager)
        results.update(res)
        used = {k: eng for k in res}
    else:
        if batches:
            log(f"    generating {sum(map(len, batches.values()))} answers with the base model")
            res, eng = generate_answers(engine, base, batches, max_new, cfg.serve, log=log, eager=eager)
            results.update(res)
            used.update({k: eng for k in res})
        if tuned:
            tmp = None
            model = merged_w8a8 if merged_w8a8 and uses_vllm(engine) else merged
            if not model:
                tmp = Path(tempfile.mkdtemp(prefix="merged-eval-"))
                model = str(merge_adapter(base, adapter, tmp / "merged"))
            try:
                log(f"    generating {sum(map(len, tuned.values()))} answers with the fine-tuned model")
                res, eng = generate_answers(engine, model, tuned, max_new, cfg.serve, log=log, eager=eager)
            finally:
                if tmp:
                    shutil.rmtree(tmp, ignore_errors=True)
            results.update(res)
            used.update({k: eng for k in res})
    # The retrieval systems first: a table printer that takes its columns from the first row shows them all.
    kinds = [u[2] for u in unans]
    if "base" in results:
        report["base"] = _metrics(results, "base", questions, contexts, "base_unanswerable", used["base"], gold,
                                  rule, kinds)
    if "finetuned" in results:
        report["finetuned"] = _metrics(results, "finetuned", questions, contexts, "finetuned_unanswerable",
                                       used["finetuned"], gold, rule, kinds)
    if "base_no_retrieval" in results:
        report["base_no_retrieval"] = _metrics(results, "base_no_retrieval", questions, None, None,
                                               used["base_no_retrieval"])
    if "base" in report and "finetuned" in report:
        report["finetuned_vs_base"] = paired_bootstrap(report["finetuned"]["_f1"], report["base"]["_f1"])
    report.update(citation_baselines(questions, contexts, gold))
    if rag_fit:
        report["train_fit"] = {s: {"f1_train": round(sum(token_f1(a, q["answer"]) for a, q in
                                                         zip(results[f"{s}_fit"]["texts"], fit_questions))
                                               / len(fit_questions), 4),
                                   "f1_test": report[s]["f1_without_abstention" if abstention else "f1"],
                                   "train_questions": len(fit_questions)}
                               for s in ("base", "finetuned") if f"{s}_fit" in results}
    report["examples"] = _examples(questions, contexts, report)
    return report


def _metrics(res: dict, name: str, questions, contexts, unans_name: str | None, engine: str,
             gold: Sequence[Collection[str]] | None = None, rule: dict | None = None,
             kinds: Sequence[str] | None = None) -> dict:
    texts = res[name]["texts"]
    m = score(texts, questions, contexts, res[unans_name]["texts"] if unans_name else None, gold,
              abstained=rule["answerable"] if rule else None,
              unanswerable_abstained=rule["unanswerable"] if rule else None,
              unanswerable_kinds=kinds if unans_name else None)
    seconds = res[name]["seconds"] + (res[unans_name]["seconds"] if unans_name else 0)
    tokens = res[name]["tokens"] + (res[unans_name]["tokens"] if unans_name else 0)
    m["tokens_per_s"] = round(tokens / seconds, 1) if seconds > 0 else 0.0
    m["questions"] = float(len(questions))
    if unans_name:
        m["unanswerable_questions"] = float(len(res[unans_name]["texts"]))
    m["engine"] = engine  # type: ignore[assignment] - text: the table printer skips it
    m["_answers"] = texts  # type: ignore[assignment] - moved to "examples" below
    return m


def _examples(questions, contexts, report: dict, n: int = 5) -> list[dict]:
    """The first few answers of each system next to the gold answer, for reading (not for scoring)."""
    rows = []
    for i, q in enumerate(questions[:n]):
        row = {"question": q["question"], "gold": q["answer"], "source": q.get("source"),
               "passages": [p["source"] for p in contexts[i]]}
        for s in SYSTEMS:
            if s in report:
                row[s] = report[s]["_answers"][i]
        rows.append(row)
    for s in SYSTEMS:
        if s in report:
            report[s].pop("_answers")
            report[s].pop("_f1")
    return rows


def answer_report(bundle: Bundle, questions: Sequence[dict], limit: int | None = None,
                  not_indexed: Sequence[str] = ()) -> dict:
    """Answer metrics for a bundle on held-out questions: {system: metrics} plus a few "examples" (answers next
    to the gold ones). Reuses the build's ``eval/answers.json`` when it scored the same questions with the same
    settings."""
    import torch

    from core.focus import bundle_focus
    from core.retrieval import Retriever
    from core.vllm_engine import int8_weights

    cfg = bundle.config
    picked = select_questions(questions, limit or cfg.eval.max_answer_questions)
    if not picked:
        return {}
    rule = AbstentionRule.from_dict(bundle.abstention.get("rule"))
    key = answers_cache_key(picked, cfg, bundle.top_k, bundle.adapter_path() is not None, bundle.passage_tokens,
                            rule)
    cached = bundle.file(ANSWERS_FILE)
    if cached.is_file() and not not_indexed:
        data = json.loads(cached.read_text())
        if data.get("key") == key:
            return dict(data["report"], cached=ANSWERS_FILE)
    retriever = Retriever.load(bundle)
    return evaluate_answers(retriever, picked, bundle.top_k, bundle.base_model_path(), cfg,
                            adapter=bundle.adapter_path(), merged=bundle.merged_path(),
                            merged_w8a8=int8_weights(bundle, "cuda" if torch.cuda.is_available() else "cpu"),
                            focus=bundle_focus(bundle, retriever), abstention=rule, not_indexed=not_indexed)


def answers_cache_key(questions: Sequence[dict], cfg: BuildConfig, top_k: int, finetuned: bool,
                      passage_tokens: tuple[int, int], abstention: AbstentionRule | None = None) -> str:
    """What ``eval/answers.json`` is valid for: the questions and every setting that changes an answer."""
    settings = {"top_k": top_k, "max_new_tokens": cfg.llm.max_new_tokens, "finetuned": finetuned,
                "passage_gap": cfg.retrieval.passage_gap, "quantize": cfg.serve.quantize,
                "passage_tokens": list(passage_tokens),
                "abstention": abstention.to_dict() if abstention else None, "v": 5}
    return question_digest(questions, settings)
