"""When the assistant says "the knowledge base does not say" instead of answering: the support check.

A 135M model fine-tuned to quote its passages does not decline on its own: shown passages that miss the
answer, it quotes them anyway (earlier runs: 0 of 58 unanswerable questions declined; taught to decline with
examples, it declined 8-17% of answerable ones instead, a lottery between runs). So the decision is taken
before the model is asked, from how well the retrieved passages match the question, by a rule the build
calibrates on its dev questions (builder/abstention.py) and every path applies alike: the gateway, the UI,
`assistant ask` and the evaluation.

The rule reads three numbers of a retrieval (``support_features``):

- ``dense_top``: cosine of the best dense match (the served embedder);
- ``bm25_top``: the best BM25 score divided by the question's total IDF, so long and short questions compare;
- ``coverage_top``: the IDF-weighted share of the question's words that occur in the first passage. A word
  no chunk holds has the highest IDF, so a question about something the documents never mention scores low.

and combines them linearly (a logistic regression on standardized features): support = w . z + b; the
assistant abstains when support < threshold. Why these: they need no model beyond the retriever's, cost
microseconds, and are on absolute scales, unlike the fused z-scores, which rank chunks within one query only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.retrieval import Lookup, Retriever

FEATURES = ("dense_top", "bm25_top", "coverage_top")


class SupportFeatures:
    """The three numbers the rule reads, for any retrieval over one retriever's chunks, weighing words by the
    retriever's term statistics (core.retrieval.TermStats, shared with passage focus)."""

    def __init__(self, retriever: Retriever):
        self.stats = retriever.term_stats

    def __call__(self, query: str, lookup: Lookup) -> dict[str, float]:
        words = self.stats.terms(query)
        mass = sum(self.stats.idf(w) for w in words)
        if not words or mass <= 0:
            return {"dense_top": float(lookup.dense_top), "bm25_top": 0.0, "coverage_top": 0.0}
        first = self.stats.chunk_terms[lookup.ranked[0][0]] if lookup.ranked else set()
        return {"dense_top": float(lookup.dense_top), "bm25_top": float(lookup.bm25_top) / mass,
                "coverage_top": sum(self.stats.idf(w) for w in words if w in first) / mass}


@dataclass(frozen=True)
class AbstentionRule:
    """support = sum_i weight_i * (feature_i - mean_i) / scale_i + bias; abstain when support < threshold.
    The manifest's ``abstention.rule`` section (``to_dict`` / ``from_dict``)."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    threshold: float
    features: tuple[str, ...] = FEATURES

    def support(self, feats: dict[str, float]) -> float:
        return self.bias + sum(w * (feats[f] - m) / s for f, m, s, w in
                               zip(self.features, self.mean, self.scale, self.weights))

    def abstains(self, feats: dict[str, float]) -> bool:
        return self.support(feats) < self.threshold

    def to_dict(self) -> dict:
        return {"features": list(self.features), "mean": list(self.mean), "scale": list(self.scale),
                "weights": list(self.weights), "bias": self.bias, "threshold": self.threshold}

    @classmethod
    def from_dict(cls, d: dict | None) -> AbstentionRule | None:
        """The rule a manifest records, or None (a bundle built before abstention, or one that has none)."""
        if not d:
            return None
        features = tuple(d.get("features", FEATURES))
        unknown = set(features) - set(FEATURES)
        if unknown:
            raise ValueError(f"the abstention rule reads features this version does not compute: {sorted(unknown)}")
        n = len(features)
        vectors = [tuple(float(x) for x in d[k]) for k in ("mean", "scale", "weights")]
        if any(len(v) != n for v in vectors) or any(s <= 0 for s in vectors[1]):
            raise ValueError("the abstention rule's mean, scale and weights must have one positive-scaled "
                             f"entry per feature ({n})")
        return cls(*vectors, bias=float(d["bias"]), threshold=float(d["threshold"]), features=features)


class Abstainer:
    """A retriever's support features with the rule that reads them: ``decide(query, lookup)``."""

    def __init__(self, retriever: Retriever, rule: AbstentionRule | None):
        self.rule = rule
        self.features = SupportFeatures(retriever) if rule is not None else None

    def decide(self, query: str, lookup: Lookup) -> bool:
        """Whether the assistant abstains for this retrieval (never without a rule)."""
        return self.rule is not None and self.rule.abstains(self.features(query, lookup))

    def decide_all(self, queries: Sequence[str], lookups: Sequence[Lookup]) -> list[bool]:
        return [self.decide(q, lk) for q, lk in zip(queries, lookups)]


def bundle_abstainer(bundle, retriever: Retriever) -> Abstainer:
    """The abstainer a bundle (core.bundle.Bundle) serves with: its calibrated rule over its retriever."""
    return Abstainer(retriever, AbstentionRule.from_dict(bundle.abstention.get("rule")))
