"""Retrieval metrics over held-out questions, for a build's retriever or any bundle's.

Every evaluator returns ``dict[str, float]``; the primary retrieval metric is ``mrr@10``. Which chunks count
as relevant to a question is ``core.gold.GoldMatcher.relevant``: the chunks of its source document holding the
gold answer, else the whole document; without a source, any chunk holding the answer.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from core.bundle import Bundle
from core.gold import GoldMatcher
from core.retrieval import DenseIndex, Retriever, encode_texts, fuse, st_encoder

KS = (1, 5, 10)


def retrieval_metrics(rankings: Sequence[Sequence[int]], relevant: Sequence[set[int]]) -> dict[str, float]:
    """recall@k (a relevant chunk in the top k), MRR@10 and nDCG@10 (binary gains), averaged over questions
    that have at least one relevant chunk."""
    totals = Counter()
    n = 0
    for ranked, rel in zip(rankings, relevant):
        if not rel:
            continue
        n += 1
        ranked = list(ranked)
        for k in KS:
            totals[f"recall@{k}"] += float(any(r in rel for r in ranked[:k]))
        rr = 0.0
        for pos, r in enumerate(ranked[:10], start=1):
            if r in rel:
                rr = 1.0 / pos
                break
        totals["mrr@10"] += rr
        dcg = sum(1.0 / math.log2(pos + 1) for pos, r in enumerate(ranked[:10], start=1) if r in rel)
        idcg = sum(1.0 / math.log2(pos + 1) for pos in range(1, min(len(rel), 10) + 1))
        totals["ndcg@10"] += dcg / idcg if idcg else 0.0
    keys = [f"recall@{k}" for k in KS] + ["mrr@10", "ndcg@10"]
    out = {k: round(totals[k] / n, 4) if n else 0.0 for k in keys}
    out["questions"] = float(n)
    return out


def evaluate_retriever(retriever, questions: Sequence[dict], mode: str | None = None, k: int = 10,
                       batch_size: int = 64) -> dict[str, float]:
    """Score a core.retrieval.Retriever (in the given mode) on questions with gold answers."""
    matcher = GoldMatcher(retriever.chunks)
    rel = [matcher.relevant(q) for q in questions]
    rankings: list[list[int]] = []
    for start in range(0, len(questions), batch_size):
        batch = [q["question"] for q in questions[start:start + batch_size]]
        rankings.extend([[pos for pos, _ in r] for r in retriever.rank(batch, k, mode)])
    return retrieval_metrics(rankings, rel)


def evaluate_modes(retriever, questions: Sequence[dict], fusions: Sequence[str], k: int = 10,
                   batch_size: int = 64) -> dict:
    """Metrics for dense, BM25 and hybrid under each fusion ('rrf:K', 'zscore:W'), from one dense and one BM25
    search per question (what ``evaluate_retriever`` would give mode by mode):
    {"dense": m, "bm25": m, "hybrid": {fusion: m}}."""
    matcher = GoldMatcher(retriever.chunks)
    rel = [matcher.relevant(q) for q in questions]
    dense: list[list[tuple[int, float]]] = []
    bm: list[list[tuple[int, float]]] = []
    for start in range(0, len(questions), batch_size):
        batch = [q["question"] for q in questions[start:start + batch_size]]
        d, b = retriever.candidates_for(batch, max(k, retriever.candidates))
        dense.extend(d)
        bm.extend(b)
    return {"dense": retrieval_metrics([[p for p, _ in d[:k]] for d in dense], rel),
            "bm25": retrieval_metrics([[p for p, _ in b[:k]] for b in bm], rel),
            "hybrid": {f: retrieval_metrics([[p for p, _ in r] for r in fuse(dense, bm, f, limit=k)], rel)
                       for f in dict.fromkeys(fusions)}}


def retrieval_report(bundle: Bundle, questions: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Metrics for every retriever a bundle can serve, on the same questions and chunks: BM25, the base
    embedder (dense, one vector per chunk), the bundle's embedder (dense over the bundle's index, sentence
    windows included where it has them; "finetuned", and "finetuned_chunk_vectors" without the windows) and
    the mode the bundle serves."""
    retriever = Retriever.load(bundle)
    served = retriever.mode
    out = {"bm25": evaluate_retriever(retriever, questions, mode="bm25")}
    finetuned = evaluate_retriever(retriever, questions, mode="dense")
    base = base_retriever(bundle, retriever)
    out["base"] = dict(finetuned) if base is None else evaluate_retriever(base, questions, mode="dense")
    out["finetuned"] = finetuned
    if retriever.dense is not None and retriever.dense.owner is not None:
        # The same embedder with one vector per chunk (what "base" is scored with), to tell what the
        # sentence windows add from what fine-tuning does.
        chunk_only = Retriever(retriever.chunks, retriever.encoder, retriever.dense.chunk_vectors(), None,
                               mode="dense", candidates=retriever.candidates)
        out["finetuned_chunk_vectors"] = evaluate_retriever(chunk_only, questions, mode="dense")
    out["served"] = dict(out["bm25"] if served == "bm25" else finetuned if served == "dense"
                         else evaluate_retriever(retriever, questions, mode=served))
    out["served"]["mode"] = served  # type: ignore[assignment]
    return out


def base_retriever(bundle: Bundle, retriever: Retriever) -> Retriever | None:
    """A dense Retriever over the bundle's chunks with the base embedder, or None when the bundle ships the base
    embedder itself (then "base" and "finetuned" are the same model); see ``base_dense_retriever``."""
    return base_dense_retriever(bundle.base_embedder_path(), bundle.embedder_info, bundle.path, retriever)


def base_dense_retriever(base_path, embedder_info: dict, bundle_dir, retriever: Retriever) -> Retriever | None:
    """The base embedder at ``base_path`` over ``retriever``'s chunks (a finished bundle's, or the one a build is
    writing in ``bundle_dir``), or None when the embedder was not fine-tuned. Chunk embeddings come from the
    build's cache (data/base_chunk_embeddings.npy) when it matches the chunks, else they are computed here."""
    from pathlib import Path

    import numpy as np
    from sentence_transformers import SentenceTransformer

    from core.hashing import ids_digest

    if not embedder_info.get("finetuned"):
        return None
    model = SentenceTransformer(str(base_path), device="cpu")
    cache = embedder_info.get("base_chunk_embeddings") or {}
    emb = None
    cached = Path(bundle_dir) / cache["path"] if cache.get("path") else None
    if cached is not None and cached.exists() and \
            cache.get("chunk_ids") == ids_digest(c.chunk_id for c in retriever.chunks):
        emb = np.load(cached)
    if emb is None or len(emb) != len(retriever.chunks):
        emb = encode_texts(model, [c.text for c in retriever.chunks], autocast_device="cpu", progress=True)
    return Retriever(retriever.chunks, st_encoder(model), DenseIndex.build(emb), retriever.bm25, mode="dense",
                     candidates=retriever.candidates, fusion=retriever.fusion)
