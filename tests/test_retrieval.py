"""Retrieval: reciprocal rank fusion, the metric definitions (exact, through the real FAISS index with a one-hot
keyword encoder), relevance, and the report `assistant eval` prints for BM25 / base / fine-tuned / served."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from builder.evaluate_retrieval import evaluate_retriever, retrieval_metrics, retrieval_report
from core.bundle import Bundle, BundleError
from core.gold import GoldMatcher
from core.retrieval import BM25Index, DenseIndex, Retriever, rrf_fuse
from tests.docs_factory import make_chunk

VOCAB = ["k0", "k1", "k2", "k3", "k4", "k5"]


def one_hot(texts):
    rows = []
    for t in texts:
        words = set(re.findall(r"k\d", t))
        rows.append([1.0 if k in words else 0.0 for k in VOCAB])
    return np.array(rows, dtype=np.float32)


# Cosine with q1 = "k0 k1": A 1, B .816, D .707, C .408, E/F 0. With q3 = "k2 k3": C .816, F .5, B .408, rest 0.
CHUNKS = [
    make_chunk("k0 k1 apples", "a.md", "A"),
    make_chunk("k0 k1 k2 harvest in june", "doc2.md", "B"),
    make_chunk("k0 k2 k3 cherries", "c.md", "C"),
    make_chunk("k0 sunrise", "d.md", "D"),
    make_chunk("k4 elderberries", "e.md", "E"),
    make_chunk("k3 k5 harvest in june", "doc2.md", "F"),
]
QUESTIONS = [
    {"question": "k0 k1", "answer": "Sunrise", "source": "d.md"},  # relevant D, ranked 3rd
    {"question": "k4", "answer": "elderberries", "source": "e.md"},  # relevant E, ranked 1st
    {"question": "k2 k3", "answer": "harvest  in June", "source": "doc2.md"},  # relevant B and F, ranked 3rd, 2nd
]


@pytest.fixture()
def retriever():
    dense = DenseIndex.build(one_hot([c.text for c in CHUNKS]))
    bm25 = BM25Index.build([c.text for c in CHUNKS])
    return Retriever(CHUNKS, one_hot, dense, bm25, mode="dense")


def test_rrf_puts_a_document_both_lists_like_above_one_only_a_single_list_tops():
    fused = rrf_fuse([[1, 2, 3], [4, 2, 5]], k=60)
    assert [d for d, _ in fused] == [2, 1, 4, 3, 5]
    assert fused[0][1] == pytest.approx(2 / 62)
    assert fused[1][1] == pytest.approx(1 / 61)


def test_rrf_scores_are_summed_reciprocal_ranks():
    fused = dict(rrf_fuse([[1, 2, 3], [3, 1, 4]], k=1))
    assert fused == pytest.approx({1: 1 / 2 + 1 / 3, 3: 1 / 4 + 1 / 2, 2: 1 / 3, 4: 1 / 4})
    assert [d for d, _ in rrf_fuse([[1, 2, 3], [3, 1, 4]], k=1)] == [1, 3, 2, 4]


def test_rrf_ties_keep_first_seen_order_and_weights_and_limit_apply():
    assert [d for d, _ in rrf_fuse([[5, 6], [6, 5]])] == [5, 6]
    assert [d for d, _ in rrf_fuse([[5, 6], [6, 5]], weights=[1.0, 2.0])] == [6, 5]
    assert len(rrf_fuse([[1, 2, 3], [4, 5, 6]], limit=2)) == 2


def test_dense_ranking_through_faiss_follows_cosine(retriever):
    ranked = [pos for pos, _ in retriever.rank(["k0 k1", "k2 k3"], k=4, mode="dense")[0]]
    assert ranked == [0, 1, 3, 2]
    ranked = [pos for pos, _ in retriever.rank(["k2 k3"], k=3, mode="dense")[0]]
    assert ranked == [2, 5, 1]


def test_metrics_on_a_one_hot_encoder_are_exact(retriever):
    m = evaluate_retriever(retriever, QUESTIONS, mode="dense")
    ndcg_q1 = (1 / math.log2(4)) / 1.0
    ndcg_q3 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert m["questions"] == 3
    assert m["recall@1"] == pytest.approx(1 / 3, abs=1e-4)
    assert m["recall@5"] == m["recall@10"] == 1.0
    assert m["mrr@10"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3, abs=1e-4)
    assert m["ndcg@10"] == pytest.approx((ndcg_q1 + 1 + ndcg_q3) / 3, abs=1e-4)


def test_recall_at_k_counts_a_hit_only_inside_the_top_k():
    m = retrieval_metrics([[9, 9, 9, 9, 9, 1]], [{1}])
    assert (m["recall@1"], m["recall@5"], m["recall@10"]) == (0.0, 0.0, 1.0)
    assert m["mrr@10"] == pytest.approx(1 / 6, abs=1e-4)


def test_questions_without_relevant_chunks_are_left_out_of_the_average():
    m = retrieval_metrics([[1], [2]], [{1}, set()])
    assert m["questions"] == 1 and m["recall@1"] == 1.0


def test_relevance_is_answer_in_a_chunk_of_the_source_else_the_whole_source():
    assert GoldMatcher(CHUNKS).relevant(QUESTIONS[2]) == {1, 5}
    paraphrase = {"question": "when?", "answer": "in the sixth month", "source": "doc2.md"}
    assert GoldMatcher(CHUNKS).relevant(paraphrase) == {1, 5}
    other_doc = {"question": "q", "answer": "sunrise", "source": "a.md"}
    assert GoldMatcher(CHUNKS).relevant(other_doc) == {0}  # the answer sits in d.md, which is not the source
    unsourced = {"question": "q", "answer": "HARVEST in june", "source": None}
    assert GoldMatcher(CHUNKS).relevant(unsourced) == {1, 5}


def test_hybrid_fuses_the_dense_and_bm25_rankings(retriever):
    retriever.candidates = 6
    dense = [p for p, _ in retriever.rank(["k0 sunrise"], 6, mode="dense")[0]]
    bm25 = [p for p, _ in retriever.rank(["k0 sunrise"], 6, mode="bm25")[0]]
    hybrid = retriever.rank(["k0 sunrise"], 3, mode="hybrid")[0]
    assert hybrid == rrf_fuse([dense, bm25], k=60, limit=3)  # the default fusion, rrf:60
    assert hybrid[0][0] == 3  # D leads both lists


def test_auto_mode_serves_the_best_held_out_mrr_and_hybrid_on_ties():
    from builder.pipeline import choose_retrieval_mode

    scores = {"dense": {"mrr@10": 0.5}, "bm25": {"mrr@10": 0.7}, "hybrid": {"mrr@10": 0.6}}
    assert choose_retrieval_mode(scores, "auto") == "bm25"
    scores["hybrid"]["mrr@10"] = 0.7
    assert choose_retrieval_mode(scores, "auto") == "hybrid"
    assert choose_retrieval_mode(scores, "dense") == "dense"
    assert choose_retrieval_mode({}, "auto") == "hybrid"


def test_generated_dev_questions_choose_a_hybrid_that_weights_dense_at_least_evenly(retriever):
    """Questions that reuse their passage's words (as generated ones do) make BM25 look best; choosing on them,
    the build still serves both retrievers."""
    from builder.pipeline import LEXICAL_DEV_RULE, _evaluate_retrieval
    from core.config import load_config

    cfg = load_config("tiny", None, ["retrieval.mode=auto"])
    retriever.candidates = 6
    # The one-hot encoder sees only "k4 k5", which point elsewhere; BM25 also matches the fruit.
    wordy = [{"question": f"k4 k5 {w}", "answer": w, "source": src}
             for w, src in (("apples", "a.md"), ("cherries", "c.md"), ("sunrise", "d.md"))]
    metrics, mode, fusion = _evaluate_retrieval(cfg, retriever, wordy)
    assert mode == "bm25" and metrics["bm25"]["mrr@10"] > metrics["hybrid"]["mrr@10"] > metrics["dense"]["mrr@10"]
    assert "zscore:0.4" in metrics["hybrid_by_fusion"] and "rule" not in metrics
    metrics, mode, fusion = _evaluate_retrieval(cfg, retriever, wordy, lexical=True)
    assert mode == "hybrid" and metrics["rule"] == LEXICAL_DEV_RULE
    assert "zscore:0.4" not in metrics["hybrid_by_fusion"] and {"zscore:0.5", "zscore:0.6"} <= set(
        metrics["hybrid_by_fusion"])
    assert fusion in metrics["hybrid_by_fusion"]


# ----------------------------------------------------------------------------------------------- the report

@pytest.fixture()
def two_embedder_bundle(tmp_path, monkeypatch) -> Path:
    """A minimal bundle whose shipped embedder differs from its base (two random tiny BERTs)."""
    monkeypatch.setenv("ASSISTANT_AUTOCAST", "off")  # cached and hand-made embeddings alike in float32
    from sentence_transformers import SentenceTransformer

    from builder import index
    from builder.embedder import chunk_ids_digest
    from core.models import build_tiny_bert
    from core.retrieval import encode_texts

    texts = [f"{c.text} " + " ".join(["field notes"] * i) for i, c in enumerate(CHUNKS)]
    chunks = [replace(c, text=t, n_tokens=10) for c, t in zip(CHUNKS, texts)]
    root = tmp_path / "bundle"
    build_tiny_bert(texts * 3, root / "embedder-base", seed=1)
    build_tiny_bert(texts * 3, root / "embedder", seed=2)
    index.run(chunks, root)
    base_emb = encode_texts(SentenceTransformer(str(root / "embedder-base"), device="cpu"), texts,
                            autocast_device="cpu")
    (root / "data").mkdir()
    np.save(root / "data" / "base_chunk_embeddings.npy", base_emb)
    manifest = {"bundle_id": "test", "retrieval": {"mode": "hybrid", "candidates": 6, "rrf_k": 60},
                "models": {"embedder": {"finetuned": True, "base": {"name": "tiny", "path": "embedder-base"},
                                        "base_chunk_embeddings": {"path": "data/base_chunk_embeddings.npy",
                                                                  "chunk_ids": chunk_ids_digest(chunks)}}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_report_scores_bm25_base_finetuned_and_served_on_the_same_questions(two_embedder_bundle):
    from sentence_transformers import SentenceTransformer

    from core.retrieval import st_encoder

    report = retrieval_report(Bundle.load(two_embedder_bundle), QUESTIONS)
    assert list(report) == ["bm25", "base", "finetuned", "served"]
    for name in report:
        assert {"recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"} <= set(report[name])
        assert report[name]["questions"] == 3
    assert report["served"]["mode"] == "hybrid"
    served = Retriever.load(two_embedder_bundle)
    assert report["finetuned"] == evaluate_retriever(served, QUESTIONS, mode="dense")
    # "base" is the base embedder's own dense retrieval, whatever the shipped embedder does
    base_model = SentenceTransformer(str(two_embedder_bundle / "embedder-base"), device="cpu")
    base_emb = base_model.encode([c.text for c in served.chunks], normalize_embeddings=True)
    by_hand = Retriever(served.chunks, st_encoder(base_model), DenseIndex.build(base_emb), None, mode="dense")
    assert report["base"] == evaluate_retriever(by_hand, QUESTIONS, mode="dense")


def test_report_base_equals_finetuned_when_the_gate_kept_the_base(two_embedder_bundle):
    manifest = json.loads((two_embedder_bundle / "manifest.json").read_text())
    manifest["models"]["embedder"]["finetuned"] = False
    (two_embedder_bundle / "manifest.json").write_text(json.dumps(manifest))
    report = retrieval_report(Bundle.load(two_embedder_bundle), QUESTIONS)
    assert report["base"] == report["finetuned"]


def test_bm25_stems_and_keeps_its_analyzer_beside_the_index(tmp_path):
    texts = ["patients were infected in the ward", "the vaccine trial enrolled adults"]
    stemmed = BM25Index.build(texts)  # default analyzer: English Snowball stemmer
    assert stemmed.analyzer["stemmer"] == "english"
    ids, scores = stemmed.search(["infections of patients"], 2)
    assert ids[0][0] == 0 and scores[0][0] > 0
    raw = BM25Index.build(texts, {"stemmer": None})
    ids, scores = raw.search(["infections"], 2)
    assert scores[0].max() == 0  # no stemming: "infections" never meets "infected"
    stemmed.save(tmp_path / "bm25")
    again = BM25Index.load(tmp_path / "bm25", len(texts))
    assert again.analyzer == stemmed.analyzer
    ids, scores = again.search(["infections"], 2)
    assert ids[0][0] == 0 and scores[0][0] > 0


def test_a_format_1_bundle_without_a_bm25_analyzer_is_refused_with_its_version_and_advice(tmp_path):
    texts = ["patients were infected in the ward", "the vaccine trial enrolled adults"]
    old = BM25Index.build(texts, {"stemmer": None, "k1": 1.5})
    (tmp_path / "index").mkdir()
    old._r.save(str(tmp_path / "index" / "bm25"))  # what bundles written before the analyzer file hold
    (tmp_path / "manifest.json").write_text(json.dumps({"bundle_id": "old", "retrieval": {"mode": "bm25"}}))
    with pytest.raises(BundleError, match="format 1 bundle .* rebuild it"):
        Bundle.load(tmp_path)


def test_bm25_bigrams_pair_neighbouring_kept_words():
    from core.retrieval import bm25_tokenize

    assert bm25_tokenize(["Lactic acid bacteria gained favour"], None, bigrams=True)[0] == [
        "lactic", "acid", "bacteria", "gained", "favour",
        "lactic_acid", "acid_bacteria", "bacteria_gained", "gained_favour"]
    # stop words go first, so a pair can span one; stems pair up as stems
    assert bm25_tokenize(["infected in the wards"], "english", bigrams=True)[0] == ["infect", "ward", "infect_ward"]
    assert bm25_tokenize(["one"], None, bigrams=True)[0] == ["one"]
    assert bm25_tokenize([""], None, bigrams=True)[0] == []


def test_bm25_bigrams_rank_the_phrase_above_its_words_scattered(tmp_path):
    texts = ["bacteria, acid and lactic salts",  # every word of the query, not as a phrase, and short
             "fermented dairy products carry lactic acid bacteria of many kinds"]
    query = ["Which lactic acid bacteria were found?"]
    unigram = BM25Index.build(texts, {"bigrams": False})
    assert unigram.search(query, 2)[0][0][0] == 0  # length normalization favours the short scattered one
    bigram = BM25Index.build(texts)  # the default analyzer pairs words
    assert bigram.analyzer["bigrams"] is True
    assert bigram.search(query, 2)[0][0][0] == 1
    bigram.save(tmp_path / "bm25")
    again = BM25Index.load(tmp_path / "bm25", len(texts))
    assert again.analyzer["bigrams"] is True and again.search(query, 2)[0][0][0] == 1
    # an analyzer written before bigrams existed means none: queries get no pairs (here over a paired corpus,
    # so the phrase bonus is gone and the short text wins again)
    (tmp_path / "bm25" / "analyzer.json").write_text('{"stemmer": "english", "k1": 1.2, "b": 0.75}')
    old = BM25Index.load(tmp_path / "bm25", len(texts))
    assert not old.analyzer.get("bigrams") and old.search(query, 2)[0][0][0] == 0


def test_evaluate_modes_matches_mode_by_mode_evaluation(retriever):
    from builder.evaluate_retrieval import evaluate_modes

    both = evaluate_modes(retriever, QUESTIONS, ["rrf:1", "rrf:60", "zscore:0.5", "zscore:1"])
    for mode in ("dense", "bm25"):
        assert both[mode] == evaluate_retriever(retriever, QUESTIONS, mode=mode)
    for k in (1, 60):
        retriever.fusion = f"rrf:{k}"
        assert both["hybrid"][f"rrf:{k}"] == evaluate_retriever(retriever, QUESTIONS, mode="hybrid")
    for spec in ("zscore:0.5", "zscore:1"):
        retriever.fusion = spec
        assert both["hybrid"][spec] == evaluate_retriever(retriever, QUESTIONS, mode="hybrid")
    # all the weight on the dense side ranks as dense does (z-scores are monotone in the scores)
    assert both["hybrid"]["zscore:1"]["mrr@10"] == both["dense"]["mrr@10"]


def test_zscore_fusion_standardizes_each_list_and_fills_missing_with_its_floor():
    from core.retrieval import zscore_fuse

    dense = [(0, 0.9), (1, 0.5), (2, 0.1)]       # z: +1.22, 0, -1.22
    bm25 = [(2, 30.0), (3, 10.0)]                # z: +1, -1
    fused = dict(zscore_fuse([dense, bm25], weights=[0.5, 0.5]))
    z = 0.4 / math.sqrt(0.32 / 3)  # (0.9 - 0.5) / std([0.9, 0.5, 0.1])
    assert abs(fused[0] - 0.5 * (z + -1.0)) < 1e-9   # missing from BM25: BM25's lowest z
    assert abs(fused[1] - 0.5 * (0.0 - 1.0)) < 1e-9
    assert abs(fused[2] - 0.5 * (-z + 1.0)) < 1e-9
    assert abs(fused[3] - 0.5 * (-z - 1.0)) < 1e-9   # missing from dense: dense's lowest z
    order = [p for p, _ in zscore_fuse([dense, bm25], weights=[0.5, 0.5])]
    assert order == [0, 2, 1, 3]
    # RRF ranks 2 first (2nd + 1st beats 1st + absent); z-scores keep dense's wide lead for 0
    assert rrf_fuse([[0, 1, 2], [2, 3]], k=1)[0][0] == 2
    # an empty list adds nothing; equal scores add zero; limit cuts
    assert zscore_fuse([[(5, 1.0), (6, 1.0)], []], limit=1) == [(5, 0.0)]


def test_within_gap_keeps_the_head_close_to_the_best_score():
    from core.retrieval import within_gap

    ranked = [(7, 3.0), (2, 2.6), (9, 1.9), (4, 2.8)]
    assert within_gap(ranked, 0.5) == [(7, 3.0), (2, 2.6), (4, 2.8)]
    assert within_gap(ranked, 0.1) == [(7, 3.0)]  # the best always stays
    assert within_gap(ranked, 0.0) == ranked and within_gap([], 1.0) == []


def test_passage_gap_trims_what_the_llm_gets_under_zscore_fusion_only(retriever):
    retriever.mode, retriever.fusion, retriever.candidates = "hybrid", "zscore:0.5", 6
    ranked = retriever.rank(["k0 k1"], 4)[0]
    gaps = [ranked[0][1] - s for _, s in ranked]
    assert gaps[1] < gaps[2]  # a list whose cut below can fall between the 2nd and 3rd
    retriever.passage_gap = (gaps[1] + gaps[2]) / 2
    assert retriever.passages(["k0 k1"], 4)[0] == ranked[:2]
    assert [h.chunk_id for h in retriever.search("k0 k1", k=4, trim=True)] == [CHUNKS[p].chunk_id for p, _ in ranked[:2]]
    assert len(retriever.search("k0 k1", k=4)) == 4  # search alone (/v1/retrieve) is never trimmed
    assert len(retriever.search("k0 k1", k=4, mode="dense", trim=True)) == 4  # another mode: not the served scores
    retriever.fusion = "rrf:60"  # rank-based scores have no scale to measure a gap on
    assert len(retriever.passages(["k0 k1"], 4)[0]) == 4


def test_fusion_specs_are_checked():
    from core.config import ConfigError, load_config
    from core.retrieval import parse_fusion

    assert parse_fusion("rrf:10") == ("rrf", 10.0) and parse_fusion("zscore:0.4") == ("zscore", 0.4)
    for bad in ("rrf", "zscore:1.5", "borda:3", "rrf:0"):
        with pytest.raises(ValueError):
            parse_fusion(bad)
    with pytest.raises(ConfigError, match="retrieval.fusion"):
        load_config("tiny", overrides=["retrieval.fusion=zscore:2"])
    assert load_config("tiny", overrides=["retrieval.fusion=zscore:0.3"]).retrieval.fusion_spec() == "zscore:0.3"
    assert load_config("tiny").retrieval.fusion_spec() == "rrf:60"


# ------------------------------------------------------------------------------------ sentence-window vectors

def test_sentence_windows_cover_each_chunk_body_after_its_header():
    from builder.index import sentence_windows

    chunks = [make_chunk("Title > Part\nOne is here. Two is here. Three is here. Four is here."),
              make_chunk("Short\nOnly one. And two."),
              make_chunk("no header line: Alpha. Beta. Gamma.")]
    texts, owner = sentence_windows(chunks, size=2, stride=2)
    assert texts == ["Title > Part\nOne is here. Two is here.", "Title > Part\nThree is here. Four is here.",
                     "no header line: Alpha. Beta.", "Beta. Gamma."]
    assert owner == [0, 0, 2, 2]  # two sentences at size 2: the chunk's own vector suffices
    texts, owner = sentence_windows(chunks[:1], size=3, stride=2)
    # starts 0 and then the last run (1), so the tail is never left out
    assert texts == ["Title > Part\nOne is here. Two is here. Three is here.",
                     "Title > Part\nTwo is here. Three is here. Four is here."]
    assert owner == [0, 0]
    with pytest.raises(ValueError):
        sentence_windows(chunks, size=0)


def test_a_chunk_scores_its_best_vector_and_results_stay_chunks(tmp_path):
    # chunk 0's own vector is k0; its window vector is k4. Chunk 1 is k1 (+ a k1,k2 window). Chunk 2 is k2.
    vectors = one_hot(["k0", "k1", "k2", "k4", "k1 k2"])
    owner = [0, 1, 2, 0, 1]
    index = DenseIndex.build(vectors, owner)
    assert index.n_chunks == 3
    ids, scores = index.search(one_hot(["k4"]), 3)
    assert ids[0][0] == 0 and scores[0][0] == pytest.approx(1.0)  # found through its window
    ids, scores = index.search(one_hot(["k2"]), 3)
    assert list(ids[0]) == [2, 1, 0]  # chunk 1 once, at its window's cosine .707, not twice
    assert scores[0][1] == pytest.approx(2 ** -0.5)
    ids, _ = index.search(one_hot(["k2"]), 10)
    assert sorted(ids[0][ids[0] >= 0]) == [0, 1, 2] and (ids[0] == -1).sum() == 0  # k capped at 3 chunks
    path = tmp_path / "dense.faiss"
    index.save(path)
    again = DenseIndex.load(path)
    assert list(again.owner) == owner and list(again.search(one_hot(["k4"]), 1)[0][0]) == [0]
    DenseIndex.build(one_hot(["k0", "k1"])).save(path)  # a one-vector-per-chunk index leaves no stale map
    assert DenseIndex.load(path).owner is None
    with pytest.raises(ValueError):
        DenseIndex(index.index, np.array([0, 1]))


def test_report_scores_the_chunk_vectors_apart_when_the_index_has_windows(two_embedder_bundle):
    from builder import index
    from core.retrieval import load_chunks

    root = two_embedder_bundle
    chunks = [replace(c, text=c.text + ". Notes were taken. More notes here.") for c in load_chunks(root / "index")]
    info = index.run(chunks, root, windows=1)
    assert info["sentence_windows"]["count"] == 3 * len(chunks) and info["vectors"] == 4 * len(chunks)
    served = Retriever.load(root)
    assert served.dense.n_chunks == len(chunks) and served.dense.index.ntotal == 4 * len(chunks)
    report = retrieval_report(Bundle.load(root), QUESTIONS)
    assert list(report) == ["bm25", "base", "finetuned", "finetuned_chunk_vectors", "served"]
    assert report["finetuned"] == evaluate_retriever(served, QUESTIONS, mode="dense")
    own = served.encoder([c.text for c in chunks])
    chunk_only = Retriever(served.chunks, served.encoder, DenseIndex.build(own), None, mode="dense")
    assert report["finetuned_chunk_vectors"] == evaluate_retriever(chunk_only, QUESTIONS, mode="dense")
