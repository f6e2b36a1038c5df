"""Calibrating the abstention rule (core/abstention.py) on dev questions, and the unanswerable questions the
evaluation asks.

Answerable cases are the dev questions as the served retriever finds them. Unanswerable cases are made the way
they occur in use, and each is retrieved by the system itself:

- ``document_left_out``: a dev question asked as if the documents that answer it were not in the index (every
  chunk of the question's own source and of the chunks the gold matcher names is excluded from the search), so
  the passages are whatever the rest of the knowledge base offers;
- ``off_topic``: questions about nothing a team's documents hold (``OFF_TOPIC``), split by a hash of their text
  into a calibration half and a half only the test report asks, so the test never sees a calibration question.

A logistic regression on the standardized features separates the two; the threshold is the highest support
that refuses at most ``retrieval.abstain_max_false_refusal`` of the answerable dev questions. Fewer than
``MIN_DEV`` dev questions calibrate nothing: the bundle then never abstains, and its manifest says why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from core.abstention import FEATURES, AbstentionRule, SupportFeatures
from core.gold import GoldMatcher
from core.hashing import stable_fraction
from core.retrieval import Retriever

MIN_DEV = 8
L2 = 1.0  # ridge on the standardized weights: three features, a few dozen to a few hundred cases
OFF_TOPIC = (
    "What is the capital city of Australia?",
    "Who wrote the novel Pride and Prejudice?",
    "How many moons does the planet Mars have?",
    "What is the boiling point of ethanol in degrees Fahrenheit?",
    "Which team won the 1998 football World Cup?",
    "How do I reset the password of my email account?",
    "What is the exchange rate between the euro and the Japanese yen today?",
    "Who painted the ceiling of the Sistine Chapel?",
    "How long should I boil an egg for a soft yolk?",
    "What is the tallest mountain in Africa?",
    "How do I change a flat tyre on a bicycle?",
    "When did the Berlin Wall fall?",
    "What is the plot of Shakespeare's Hamlet?",
    "How many players are on a volleyball team?",
    "What does a JavaScript closure capture?",
    "Which planet has the longest day in the solar system?",
    "How do I knit a scarf for beginners?",
    "What is the speed of sound in water?",
    "Who composed the Four Seasons?",
    "What are the rules of chess castling?",
    "How do I get a visa to visit Japan?",
    "What time zone is New Zealand in?",
    "Which ocean is the deepest?",
    "How do I make sourdough starter at home?",
)


def off_topic(split: str) -> list[str]:
    """The off-topic questions of one half: 'calibration' (the build's dev) or 'test' (the test report)."""
    want_test = split == "test"
    return [q for q in OFF_TOPIC if (stable_fraction(q, 23) < 0.5) == want_test]


def left_out_chunks(matcher: GoldMatcher, chunks, question: dict) -> set[int]:
    """Positions of every chunk of the documents that answer ``question``: its own source and the sources of
    the chunks the gold matcher calls relevant."""
    sources = {chunks[i].source for i in matcher.relevant(question)}
    if question.get("source"):
        sources.add(question["source"])
    return {i for i, c in enumerate(chunks) if c.source in sources}


def left_out(retriever: Retriever, questions: Sequence[dict]) -> list[tuple[dict, set[int]]]:
    """(question, the chunk positions its search leaves out) for each question that leaves something to search:
    the documents that answer it go, the rest of the knowledge base stays."""
    matcher = GoldMatcher(retriever.chunks)
    pairs = [(q, left_out_chunks(matcher, retriever.chunks, q)) for q in questions]
    return [(q, e) for q, e in pairs if len(e) < len(retriever.chunks)]


def support_cases(retriever: Retriever, questions: Sequence[dict], off: Sequence[str]
                  ) -> tuple[list[dict], list[dict]]:
    """(features of each answerable question, features of each unanswerable case: the same questions with their
    documents left out, then ``off``)."""
    feats = SupportFeatures(retriever)
    texts = [q["question"] for q in questions]
    k = retriever.candidates
    answerable = [feats(t, lk) for t, lk in zip(texts, retriever.lookup(texts, k))]
    kept = left_out(retriever, questions)
    found = retriever.lookup([q["question"] for q, _ in kept], k, exclude=[e for _, e in kept])
    unanswerable = [feats(q["question"], lk) for (q, _), lk in zip(kept, found)]
    unanswerable += [feats(q, lk) for q, lk in zip(off, retriever.lookup(list(off), k))]
    return answerable, unanswerable


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = L2, steps: int = 3000
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(mean, scale, weights, bias) of an L2-regularized logistic regression on standardized features, by
    gradient descent (the loss is convex; 3,000 steps of a few hundred rows take milliseconds)."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = (x - mean) / scale
    w = np.zeros(z.shape[1])
    b = 0.0
    n = len(y)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(z @ w + b)))
        w -= 0.5 * (z.T @ (p - y) + l2 * w) / n
        b -= 0.5 * float(np.mean(p - y))
    return mean, scale, w, b


def threshold_for(answerable: Sequence[float], max_false_refusal: float) -> float:
    """The highest threshold that refuses at most ``max_false_refusal`` of the answerable supports: halfway
    between the last one it may refuse and the first it must keep (just below the lowest when none may go)."""
    s = sorted(answerable)
    m = math.floor(max_false_refusal * len(s) + 1e-9)
    if m >= len(s):
        return s[-1] + 1e-6
    return (s[m - 1] + s[m]) / 2 if m > 0 else s[0] - 1e-6


def calibrate(retriever: Retriever, dev: Sequence[dict], max_false_refusal: float, dev_from: str) -> dict:
    """The manifest's ``abstention`` section: the rule (or none, and why) and how it did on the dev cases."""
    if len(dev) < MIN_DEV:
        return {"rule": None, "calibrated_on": dev_from,
                "decision": f"no abstention: {len(dev)} dev questions, at least {MIN_DEV} are needed to "
                            "calibrate it, so the bundle always answers"}
    answerable, unanswerable = support_cases(retriever, dev, off_topic("calibration"))
    x = np.array([[f[k] for k in FEATURES] for f in answerable + unanswerable], dtype=float)
    y = np.r_[np.ones(len(answerable)), np.zeros(len(unanswerable))]
    mean, scale, w, b = fit_logistic(x, y)
    rule = AbstentionRule(tuple(mean.tolist()), tuple(scale.tolist()), tuple(w.tolist()), float(b), 0.0)
    threshold = threshold_for([rule.support(f) for f in answerable], max_false_refusal)
    rule = AbstentionRule(rule.mean, rule.scale, rule.weights, rule.bias, float(threshold))
    n_left = len(unanswerable) - len(off_topic("calibration"))
    refused = [rule.abstains(f) for f in unanswerable]
    dev_report = {"false_refusal": round(sum(rule.abstains(f) for f in answerable) / len(answerable), 4),
                  "refusal_document_left_out": round(sum(refused[:n_left]) / max(1, n_left), 4),
                  "refusal_off_topic": round(sum(refused[n_left:]) / max(1, len(refused) - n_left), 4),
                  "answerable": len(answerable), "document_left_out": n_left,
                  "off_topic": len(refused) - n_left}
    return {"rule": rule.to_dict(), "calibrated_on": dev_from, "max_false_refusal": max_false_refusal,
            "dev": dev_report,
            "decision": (f"abstains below support {threshold:.3f}: on the {dev_from} ({len(answerable)} questions) it refused "
                         f"{dev_report['false_refusal']:.0%} of answerable questions, "
                         f"{dev_report['refusal_document_left_out']:.0%} of them asked with their documents "
                         f"left out and {dev_report['refusal_off_topic']:.0%} of off-topic ones")}
