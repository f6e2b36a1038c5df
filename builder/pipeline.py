"""The build: knowledge folder -> versioned bundle. Each stage is a plain function in its own module.

    assistant build knowledge --profile tiny --out /tmp/bundles
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import replace
from pathlib import Path

from builder import abstention, embedder, generated_questions, index, ingest, llm
from builder import chunk as chunk_stage
from builder.chat_examples import template_sample
from builder.evaluate_retrieval import base_dense_retriever, evaluate_modes, evaluate_retriever
from builder.generated_questions import GENERATED_DEV, GeneratedQuestions, ask_writer, llm_writer
from builder.questions import qa_to_dict, read_questions, split_train_dev_test
from builder.report_card import bundle_card
from builder.report_card import render as render_card
from builder.teacher import openai_teacher
from core.abstention import AbstentionRule
from core.bundle import (
    DEV_FILE,
    EMBEDDER_DIR,
    HELDOUT_FILE,
    LLM_BASE_REF,
    METRICS_FILE,
    REPORT_FILE,
    TINY_EMBEDDER_DIR,
    TINY_LLM_DIR,
    BundleWriter,
    ServedRetrieval,
    make_bundle_id,
    make_manifest,
)
from core.config import BuildConfig, dumps, parse_fusion
from core.device import get_device, set_threads
from core.hashing import folder_sha256
from core.log import check_interrupted, say, step
from core.models import build_tiny_bert, build_tiny_llama, resolve_embedder, resolve_llm
from core.retrieval import Retriever


class NothingToIngest(RuntimeError):
    """The knowledge folder holds no file that could be ingested."""


def _drop_heldout_blocks(documents: list[ingest.Document], held: set[str]) -> list[ingest.Document]:
    """Held-out question/answer pairs are evaluation data: they are not indexed, so they cannot leak."""
    out = []
    for d in documents:
        blocks = [b for b in d.blocks if not (b.kind == "qa" and b.headings and b.headings[-1] in held)]
        if blocks:
            out.append(replace(d, blocks=blocks))
    return out


def build(cfg: BuildConfig, knowledge_dir: str | Path, out_dir: str | Path,
          questions_file: str | Path | None = None) -> Path:
    """Run every stage and return the committed bundle's path."""
    t0 = time.perf_counter()
    set_threads()
    knowledge_dir = Path(knowledge_dir)
    device = get_device(cfg.device)
    timing: dict[str, float] = {}

    with step(f"ingest {knowledge_dir}") as s:
        res = ingest.run(cfg.ingest, knowledge_dir, log=say)
    timing["ingest_s"] = s["seconds"]
    say(f"    {res.summary()}")
    if not res.documents:
        raise NothingToIngest(
            f"nothing to ingest in {knowledge_dir}: {len(res.errors)} files failed, {len(res.skipped)} "
            f"unsupported. Supported: .md .txt .html .pdf .docx .csv *.qa.jsonl")
    extra_train = read_questions(questions_file) if questions_file else []

    # The id names what was asked for; the manifest records the config as it ran (the choices made on the way).
    bundle_id = make_bundle_id(knowledge_dir, [f["sha256"] or "" for f in res.files], dumps(cfg))
    ran = copy.deepcopy(cfg)
    writer = BundleWriter(Path(out_dir), bundle_id)
    try:
        qa = [qa_to_dict(p) for p in res.qa_pairs]
        qa_train, qa_dev, qa_test = split_train_dev_test(qa, cfg.datagen.dev_fraction,
                                                         cfg.datagen.holdout_fraction, cfg.seed)
        documents = _drop_heldout_blocks(res.documents, {q["question"] for q in qa_dev + qa_test})
        train_questions = qa_train + extra_train
        writer.write_jsonl(HELDOUT_FILE, qa_test)
        writer.write_jsonl(DEV_FILE, qa_dev)
        corpus = [d.text for d in documents]

        # Base embedder: the tiny one is random and built here, so it travels in the bundle.
        if cfg.embedder.base_model == "tiny":
            base_emb = build_tiny_bert(corpus, writer.path(TINY_EMBEDDER_DIR), seed=cfg.seed)
            base_emb_ref = {"name": "tiny", "path": TINY_EMBEDDER_DIR}
        else:
            base_emb = Path(resolve_embedder(cfg.embedder.base_model))
            base_emb_ref = {"name": cfg.embedder.base_model, "path": str(base_emb)}

        with step("chunk") as s:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(base_emb))
            chunks = chunk_stage.run(cfg.chunk, documents, chunk_stage.hf_token_counter(tok))
        timing["chunk_s"] = s["seconds"]
        say(f"    {len(chunks)} chunks, at most {max(c.n_tokens for c in chunks)} tokens")

        # The base LLM is resolved before the embedder stage: it writes the generated questions both stages use.
        if cfg.llm.base_model == "tiny":
            base_llm = build_tiny_llama(corpus, writer.path(TINY_LLM_DIR), seed=cfg.seed)
            llm_ref = {"name": "tiny", "path": TINY_LLM_DIR}
        else:
            base_llm = resolve_llm(cfg.llm.base_model)
            llm_ref = {"name": cfg.llm.base_model, "path": str(base_llm)}

        with step("questions from the documents") as s:
            wanted = cfg.embedder.finetune or cfg.datagen.generate_questions
            ranker = embedder.base_ranker(cfg, base_emb, chunks, device) if wanted else None
            generated = _generate_questions(cfg, chunks, ranker, str(base_llm))
        timing["generate_s"] = s["seconds"]

        with step("embedder") as s:
            emb_info = embedder.run(cfg, base_emb, chunks, train_questions, writer.tmp, device=device, ranker=ranker,
                                    generated=generated)
            chunk_embeddings = emb_info.pop("chunk_embeddings", None)  # reused by the index, not in the manifest
        timing["embedder_s"] = s["seconds"]
        base_emb_ref["sha256"] = folder_sha256(Path(base_emb))
        emb_info["base"] = base_emb_ref
        emb_info["sha256"] = folder_sha256(writer.path(EMBEDDER_DIR))

        with step("index") as s:
            index_info = index.run(chunks, writer.tmp, device=device,
                                   embeddings=chunk_embeddings, bm25_analyzer=cfg.retrieval.bm25_analyzer(),
                                   windows=cfg.retrieval.sentence_windows,
                                   window_stride=cfg.retrieval.window_stride)
        timing["index_s"] = s["seconds"]

        with step("evaluate retrieval") as s:
            # Dev chooses; without dev FAQ pairs, the real questions the embedder held out do (never trained on);
            # without any real question, the generated dev questions.
            dev_questions, dev_from = _dev_questions(qa_dev, embedder.heldout_questions(writer.tmp), generated)
            # One retriever of the unfinished bundle serves the choice on dev and the score on test: the fusion
            # is passed to each explicitly, so its own setting does not matter.
            retriever = llm.load_retriever(writer.tmp, cfg, mode="hybrid")
            dev_retrieval, mode, fusion = _evaluate_retrieval(cfg, retriever, dev_questions,
                                                              lexical=dev_from == GENERATED_DEV)
            ran.retrieval.fusion = fusion
            name, param = parse_fusion(fusion)
            if name == "rrf":
                ran.retrieval.rrf_k = int(param)
            dev_retrieval["questions_from"] = dev_from  # type: ignore[assignment]
            test_retrieval = _score_retrieval(retriever, qa_test, mode, fusion) if qa_test else {}
            base_dense = base_dense_retriever(base_emb, emb_info, writer.tmp, retriever) if qa_test else None
            if base_dense is not None:  # what fine-tuning the embedder changed, on the same test questions
                test_retrieval["base_dense"] = evaluate_retriever(base_dense, qa_test, mode="dense")
        timing["eval_retrieval_s"] = s["seconds"]

        with step("abstention (calibrated on dev)") as s:
            abstention_info = (abstention.calibrate(retriever.ranking_as(mode, fusion), dev_questions,
                                                    cfg.retrieval.abstain_max_false_refusal, dev_from)
                               if cfg.retrieval.abstain else
                               {"rule": None, "decision": "no abstention (retrieval.abstain=false)"})
            say(f"    {abstention_info['decision']}")
        timing["abstention_s"] = s["seconds"]

        with step("llm") as s:
            if Path(str(base_llm)).is_dir():
                llm_ref["sha256"] = folder_sha256(Path(base_llm))
            writer.write_json(LLM_BASE_REF, llm_ref)
            # The LLM stage retrieves with the chosen fusion, exactly as serving will.
            llm_info = llm.run(ran, base_llm, chunks, train_questions, qa_dev, qa_test, writer.tmp,
                               device=device, retrieval_mode=mode,
                               abstention=AbstentionRule.from_dict(abstention_info["rule"]), generated=generated)
            ran.llm.max_steps = llm_info.pop("max_steps", ran.llm.max_steps)
        timing["llm_s"] = s["seconds"]
        llm_info["base"] = llm_ref
        for key in ("adapter", "merged"):
            if llm_info.get(key) and writer.path(llm_info[key]).is_dir():
                llm_info[f"{key}_sha256"] = folder_sha256(writer.path(llm_info[key]))
        timing["total_s"] = round(time.perf_counter() - t0, 2)

        # What is reported is the test split, scored once; what chose the settings is beside it, under "dev".
        dev_answers = llm_info.pop("dev_metrics", {})
        test_answers = llm_info.pop("metrics", {})
        chose_retrieval = (f"{dev_from} ({len(dev_questions)} questions)" if cfg.retrieval.mode == "auto"
                           else "configured")
        if dev_retrieval.get("rule"):
            chose_retrieval += f"; {dev_retrieval['rule']}"
        metrics = {"retrieval": test_retrieval or dict(dev_retrieval, split="dev (no test questions)"),
                   **({"answers": test_answers} if test_answers else {}),
                   "dev": {"retrieval": dev_retrieval, **({"answers": dev_answers} if dev_answers else {})},
                   "selection": {"retrieval.mode": chose_retrieval, "retrieval.fusion": chose_retrieval,
                                 "embedder gate": emb_info.get("gate", {}).get("on", "none"),
                                 "llm gate": llm_info.get("gate_from", "none"),
                                 "abstention": abstention_info.get("calibrated_on", "none"),
                                 "reported": f"test split ({len(qa_test)} questions)" if qa_test else "none"}}
        writer.write_json(METRICS_FILE, metrics)
        manifest = make_manifest(
            bundle_id=bundle_id, config=ran, retrieval=ServedRetrieval.from_config(ran.retrieval, mode),
            knowledge={"root": str(knowledge_dir.resolve()), "files": res.files,
                       "documents": len(res.documents), "qa_pairs": len(res.qa_pairs)},
            models={"embedder": emb_info, "llm": llm_info}, abstention=abstention_info,
            index=index_info,
            data={"train_questions": len(train_questions), "dev_questions": len(qa_dev),
                  "test_questions": len(qa_test), "heldout_questions": len(qa_test),
                  "extra_questions": len(extra_train), "chunks": len(chunks),
                  "generated_questions": dict(generated.stats, sample=generated.sample(20, cfg.seed),
                                              templates=template_sample(chunks, 20, cfg.seed)),
                  "max_chunk_tokens": max(c.n_tokens for c in chunks)},
            errors=res.errors, warnings=res.warnings, skipped=res.skipped, metrics=metrics, timing=timing)
        with step("report card") as s:
            card = bundle_card(writer.tmp, manifest, llm.load_retriever(writer.tmp, ran, mode), qa_test)
            writer.path(REPORT_FILE).write_text(render_card(card), encoding="utf-8")
        check_interrupted()  # a Ctrl-C, even one swallowed on the way, never lets the bundle land
        path = writer.commit(manifest)
    except BaseException:
        writer.abort()
        raise
    say(f"==> bundle written in {timing['total_s']:.1f} s")
    return path


def _generate_questions(cfg: BuildConfig, chunks: list, ranker, base_llm: str) -> GeneratedQuestions:
    """The build's generated questions (builder.generated_questions), or none where switched off or where no
    base ranking exists to check them (embedder.finetune=false)."""
    dcfg = cfg.datagen
    if not dcfg.generate_questions or ranker is None or not dcfg.generated_max:
        say("    no generated questions (datagen.generate_questions=false or datagen.generated_max=0)")
        return GeneratedQuestions(stats={"writer": "none"})
    if dcfg.teacher_url and dcfg.teacher_model:
        write, written_by = ask_writer(openai_teacher(dcfg.teacher_url, dcfg.teacher_model), say), dcfg.teacher_model
    else:
        write, written_by = llm_writer(base_llm, cfg, say), f"base LLM ({cfg.llm.base_model})"
    out = generated_questions.generate(chunks, write, ranker.rank, limit=dcfg.generated_max,
                                       per_chunk=dcfg.questions_per_chunk,
                                       dev_fraction=dcfg.generated_dev_fraction, round_trip_k=dcfg.round_trip_k,
                                       seed=cfg.seed, log=say)
    out.stats["writer"] = written_by
    return out


def _dev_questions(qa_dev: list[dict], embedder_heldout: list[dict], generated: GeneratedQuestions
                   ) -> tuple[list[dict], str]:
    """The questions that choose retrieval and calibrate abstention, and where they came from, in order of
    preference: the dev split, the real questions the embedder held out, the generated dev questions."""
    for questions, name in ((qa_dev, "dev split"), (embedder_heldout, "embedder held-out questions"),
                            (generated.dev, GENERATED_DEV)):
        if questions:
            return questions, name
    return [], "none"


# Generated questions share a word with their sentence by construction (the round trip's filter) and the small
# writer copies many more, so they flatter BM25: on COVID-QA's generated dev questions BM25 scored MRR@10 0.91
# and the fine-tuned embedder 0.78, on its real training-share questions 0.67 and 0.59. Choosing on them, the
# build keeps both retrievers (hybrid) and never weights BM25 above dense.
LEXICAL_MIN_DENSE_WEIGHT = 0.5
LEXICAL_DEV_RULE = (f"hybrid only, dense weight at least {LEXICAL_MIN_DENSE_WEIGHT:g} (generated questions reuse "
                    "their sentence's words)")


def _evaluate_retrieval(cfg: BuildConfig, retriever: Retriever, held: list[dict], lexical: bool = False
                        ) -> tuple[dict, str, str]:
    """Metrics for BM25, dense and hybrid on the held-out questions, the mode to serve and the hybrid fusion.
    'auto' picks the mode by MRR@10, and the fusion among RRF at each of ``retrieval.rrf_k_choices`` and
    z-score fusion at each of ``retrieval.zscore_weight_choices``; otherwise the configured fusion stays.
    ``lexical`` questions (generated ones) choose under LEXICAL_DEV_RULE."""
    rcfg = cfg.retrieval
    configured = rcfg.fusion_spec()
    fusion = configured
    metrics: dict[str, dict] = {}
    auto = rcfg.mode == "auto"
    ruled = lexical and auto
    if held:
        weights = [float(w) for w in rcfg.zscore_weight_choices
                   if not ruled or float(w) >= LEXICAL_MIN_DENSE_WEIGHT]
        fusions = [configured] + ([f"rrf:{int(k)}" for k in rcfg.rrf_k_choices]
                                  + [f"zscore:{w:g}" for w in weights] if auto else [])
        by_mode = evaluate_modes(retriever, held, fusions)
        by_fusion = by_mode["hybrid"]
        metrics["dense"], metrics["bm25"] = by_mode["dense"], by_mode["bm25"]
        # Best MRR@10; on a tie the configured fusion.
        best = max(by_fusion, key=lambda f: (by_fusion[f]["mrr@10"], f == configured))
        metrics["hybrid"] = by_fusion[best]
        if auto:
            metrics["hybrid_by_fusion"] = {f: m["mrr@10"] for f, m in by_fusion.items()}  # type: ignore[assignment]
            fusion = best
    chosen = "hybrid" if ruled else choose_retrieval_mode(metrics, rcfg.mode)
    if ruled:
        metrics["rule"] = LEXICAL_DEV_RULE  # type: ignore[assignment]
    metrics["served_mode"] = chosen  # type: ignore[assignment]
    metrics["fusion"] = fusion  # type: ignore[assignment]
    return metrics, chosen, fusion


def _score_retrieval(retriever: Retriever, test: list[dict], mode: str, fusion: str) -> dict:
    """Dense, BM25 and hybrid (at the chosen fusion) on the test questions, once, after every choice was made."""
    by_mode = evaluate_modes(retriever, test, [fusion])
    metrics = {"dense": by_mode["dense"], "bm25": by_mode["bm25"], "hybrid": by_mode["hybrid"][fusion]}
    return {**metrics, "served": metrics[mode], "served_mode": mode, "fusion": fusion,
            "split": "test", "questions_from": f"test split ({len(test)} questions)"}


def choose_retrieval_mode(metrics: dict[str, dict], requested: str) -> str:
    """The configured mode, or under 'auto' the one with the best held-out MRR@10 (hybrid on ties, and
    when there is nothing to measure on)."""
    if requested != "auto":
        return requested
    if not all(m in metrics for m in ("hybrid", "dense", "bm25")):
        return "hybrid"
    return max(("hybrid", "dense", "bm25"), key=lambda m: (metrics[m]["mrr@10"], m == "hybrid"))


def clean_stale_tmp(out_dir: Path, max_age_s: float = 24 * 3600) -> None:
    """Remove temporary folders of builds killed more than a day ago."""
    if not out_dir.is_dir():
        return
    now = time.time()
    for p in out_dir.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


