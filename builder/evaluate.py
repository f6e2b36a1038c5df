"""Evaluation: retrieval metrics over held-out questions (and, with the LLM stage, answer metrics).

Every evaluator returns ``dict[str, float]``; the primary retrieval metric is ``mrr@10``.

Relevance: a chunk is relevant to a question when it comes from the question's source document and contains
the gold answer (case- and whitespace-normalized). Where no chunk of that document contains the answer
verbatim, every chunk of the source document is relevant (the document is the unit). A question with no
source counts chunks from any document that contain the answer.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

KS = (1, 5, 10)


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def relevant_chunks(question: dict, chunks: Sequence[dict], by_source: dict[str, list[int]] | None = None) -> set[int]:
    """Positions of the chunks relevant to one question ({"question", "answer", "source"?})."""
    answer = normalize(question.get("answer", ""))
    source = question.get("source")
    if by_source is None:
        by_source = group_by_source(chunks)
    if source:
        pool = by_source.get(source, [])
        hits = {i for i in pool if answer and answer in normalize(chunks[i]["text"])}
        return hits or set(pool)
    return {i for i, c in enumerate(chunks) if answer and answer in normalize(c["text"])}


def group_by_source(chunks: Sequence[dict]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, c in enumerate(chunks):
        out.setdefault(c["source"], []).append(i)
    return out


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
    """Score a serving.retrieval.Retriever (in the given mode) on questions with gold answers."""
    by_source = group_by_source(retriever.chunks)
    rel = [relevant_chunks(q, retriever.chunks, by_source) for q in questions]
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
    from serving.retrieval import fuse

    by_source = group_by_source(retriever.chunks)
    rel = [relevant_chunks(q, retriever.chunks, by_source) for q in questions]
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


# ----------------------------------------------------------------------------------------------- answers

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


def retrieval_report(bundle, questions: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Metrics for every retriever a bundle can serve, on the same questions and chunks: BM25, the base
    embedder (dense, one vector per chunk), the bundle's embedder (dense over the bundle's index, sentence
    windows included where it has them; "finetuned", and "finetuned_chunk_vectors" without the windows) and
    the mode the bundle serves."""
    from serving.retrieval import Retriever

    retriever = Retriever.load(bundle.path)
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


def base_retriever(bundle, retriever):
    """A dense Retriever over the bundle's chunks with the base embedder, or None when the bundle ships the base
    embedder itself (then "base" and "finetuned" are the same model). Chunk embeddings come from the build's
    cache (data/base_chunk_embeddings.npy) when it matches the chunks, else they are computed here."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from builder.embedder import chunk_ids_digest, encode_texts
    from serving.retrieval import DenseIndex, Retriever, st_encoder

    info = bundle.manifest.get("models", {}).get("embedder", {})
    if not info.get("finetuned"):
        return None
    ref = info.get("base") or {}
    path = Path(ref.get("path", ""))
    if ref.get("path") and not path.is_absolute():
        path = bundle.path / path
    if not ref.get("path") or not path.exists():
        from builder.models import resolve_embedder

        path = Path(resolve_embedder(ref.get("name", "minilm")))
    model = SentenceTransformer(str(path), device="cpu")
    cache = info.get("base_chunk_embeddings") or {}
    emb = None
    if cache.get("path") and (bundle.path / cache["path"]).exists() and \
            cache.get("chunk_ids") == chunk_ids_digest(retriever.chunks):
        emb = np.load(bundle.path / cache["path"])
    if emb is None or len(emb) != len(retriever.chunks):
        emb = encode_texts(model, [c["text"] for c in retriever.chunks], "cpu", progress=True)
    return Retriever(retriever.chunks, st_encoder(model), DenseIndex.build(emb), retriever.bm25, mode="dense",
                     candidates=retriever.candidates, rrf_k=retriever.rrf_k, fusion=retriever.fusion)
