"""Questions written from the documents by a language model, for the folders that come without any.

Each chosen chunk shows one of its sentences (or a few, one per prompt: ``datagen.questions_per_chunk``) to a
writer (the teacher endpoint when ``datagen.teacher_url`` is set, otherwise the build's own base LLM through the
offline engine the evaluation uses) and asks for the question that sentence answers. A sentence rather than the
whole chunk because the embedded 135M model, asked about a whole chunk, wrote mostly questions about "the text"
(measured on COVID-QA chunks, history file), and because a sentence-long prompt costs a third of a chunk-long one.

A written question is kept only when it passes the round trip: it reads as a question (ends with "?", four
words or more, asks about the subject and not about "the sentence" or "the answer"), it is not the sentence
copied, and its own chunk ranks in the top ``datagen.round_trip_k`` of the base embedder fused with BM25. Its
answer is the sentence, so the answer is in the chunk by construction.

Chunks are divided by a hash of their id. The dev share (``datagen.generated_dev_fraction``) is written by a
second prompt, worded differently, and none of its chunks is the positive of any synthetic training pair: the
gates (embedder, retrieval mode, adapter) and the abstention rule of a folder without real questions are decided
on questions about passages the fine-tunes never trained on, in wording their training data did not use.

    python -c "from builder.generated_questions import PROMPTS; print(PROMPTS['train'])"
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from core.bundle import Chunk
from core.hashing import stable_fraction
from core.text import normalize, split_clauses, split_header, words

# prompts -> replies, one per prompt, in order (builder.evaluate_answers.generate_answers or a teacher)
Write = Callable[[list[str]], list[str]]

# The training prompt shows two examples from outside any knowledge base (how-to and when), so the form users
# ask in is what the model copies; the dev prompt has none and other words.
EXAMPLES = (("To reset the router, hold the power button for ten seconds.", "How do I reset the router?"),
            ("The museum is closed on Mondays and public holidays.", "When is the museum closed?"))
PROMPTS = {
    "train": "Write the question that the sentence answers.\n\n" + "".join(
        f"Sentence: {s}\nQuestion: {q}\n\n" for s, q in EXAMPLES) + "Sentence: {sentence}\nQuestion:",
    "dev": "Turn this sentence into a question that it answers.\nSentence: {sentence}\nQuestion:",
}
MAX_NEW_TOKENS = 40
GENERATED_DEV = "generated dev questions"  # how gates and the manifest name the dev questions made here
SENTENCE_MIN_WORDS, SENTENCE_MAX_WORDS = 6, 40
QUESTION_MIN_WORDS = 4
# Replies about the prompt rather than the passage ("What is the answer to this question?").
META = re.compile(r"\b(question|answer|sentence|passage|text)s?\b", re.IGNORECASE)


@dataclass
class GeneratedQuestions:
    """What the writer produced for one build: question dicts (question, answer, source, gold, origin)."""

    train: list[dict] = field(default_factory=list)
    dev: list[dict] = field(default_factory=list)
    dev_chunks: set[int] = field(default_factory=set)  # positions no synthetic training pair may use
    stats: dict = field(default_factory=dict)

    def sample(self, n: int = 20, seed: int = 0) -> list[dict]:
        """Up to n kept training questions spread over the folder (for the report card and the README)."""
        order = sorted(self.train, key=lambda q: stable_fraction(f"sample:{q['question']}", seed))
        # Overlapping chunks share sentences, so a question can be kept twice: the sample shows it once.
        unique = list({q["question"]: q for q in order}.values())
        return [{"question": q["question"], "answer": q["answer"], "source": q["source"]} for q in unique[:n]]


def sentences_for(chunk: Chunk, min_sentences: int = 1) -> list[str]:
    """Sentences of a chunk's body a query can be made from (not too short, not too long); none when the body
    has fewer than ``min_sentences`` (a cloze query needs one left behind). Generated questions and the
    embedder's cloze pairs both draw from these."""
    _, body = split_header(chunk.text)
    sentences = split_clauses(body)
    if len(sentences) < min_sentences:
        return []
    return [s for s in sentences if SENTENCE_MIN_WORDS <= len(s.split()) <= SENTENCE_MAX_WORDS]


def dev_chunks(chunks: Sequence[Chunk], fraction: float, seed: int) -> set[int]:
    """Positions of the chunks whose questions are dev questions (a hash of the chunk id: stable on rebuilds)."""
    return {i for i, c in enumerate(chunks) if c.kind != "qa" and stable_fraction(f"gen-dev:{c.chunk_id}", seed)
            < fraction}


# Words a question shares with any sentence: sharing only these is not being about it.
_STOP = {"what", "how", "why", "when", "where", "which", "who", "is", "are", "the", "a", "an", "of", "to", "in",
         "do", "does", "i", "can", "for", "and", "on", "with"}


_EXAMPLE_WORDS = {w for pair in EXAMPLES for text in pair for w in words(text)} - _STOP


def clean_question(reply: str, sentence: str) -> str | None:
    """The reply's first line if it reads as a question about the subject, else None."""
    line = next((ln.strip() for ln in reply.splitlines() if ln.strip()), "")
    line = re.sub(r"^(?:question\s*:\s*|\d+[.)]\s*|[-*•]\s*)", "", line, flags=re.IGNORECASE).strip().strip('"')
    if not line.endswith("?") or len(line.split()) < QUESTION_MIN_WORDS or META.search(line):
        return None
    if normalize(line.rstrip("?")) == normalize(sentence.rstrip(".")):
        return None
    # A question sharing no word with its sentence was written about something else; one using a word of the
    # examples that its sentence lacks ("When is the museum ...?") copied the prompt instead.
    asked, given = set(words(line)), set(words(sentence))
    if not asked & given - _STOP or asked & _EXAMPLE_WORDS - given:
        return None
    return line


def generate(chunks: Sequence[Chunk], write: Write, rank: Callable[[Sequence[str], int], list[list[int]]], *,
             limit: int, per_chunk: int, dev_fraction: float, round_trip_k: int, seed: int = 0,
             log: Callable[[str], None] | None = None) -> GeneratedQuestions:
    """Up to ``per_chunk`` questions per chunk, each from a different sentence (at most ``limit`` chunks, visited
    in a seeded order so a small limit still spreads over the documents), written by ``write``, kept when the round
    trip through ``rank`` (queries, k) -> top-k chunk positions finds its chunk.

    Questions come out in rounds: every chunk's first, then every chunk's second, and so on, so a budget that
    keeps only the first n (datagen.max_synthetic) covers as many chunks as it can."""
    held = dev_chunks(chunks, dev_fraction, seed)
    order = sorted((i for i, c in enumerate(chunks) if c.kind != "qa"),
                   key=lambda i: stable_fraction(f"gen:{chunks[i].chunk_id}", seed))
    picked: dict[int, list[str]] = {}
    for i in order[:limit]:
        options = sentences_for(chunks[i])
        if options:
            rng = random.Random(f"{seed}:gen:{chunks[i].chunk_id}")
            picked[i] = rng.sample(options, min(per_chunk, len(options)))
    jobs: list[tuple[int, str, str]] = [  # (position, sentence, prompt name), round by round
        (i, sents[r], "dev" if i in held else "train")
        for r in range(per_chunk) for i, sents in picked.items() if r < len(sents)]
    replies = write([PROMPTS[p].format(sentence=s) for _, s, p in jobs]) if jobs else []
    formed = [(job, q) for job, reply in zip(jobs, replies) if (q := clean_question(reply, job[1]))]
    ranked = rank([q for _, q in formed], round_trip_k) if formed else []
    out = GeneratedQuestions(dev_chunks=held)
    for ((i, sentence, prompt), q), top in zip(formed, ranked):
        if i in top[:round_trip_k]:
            row = {"question": q, "answer": sentence, "source": chunks[i].source, "gold": [i], "origin": "generated"}
            (out.dev if prompt == "dev" else out.train).append(row)
    out.stats = {"chunks_asked": len(picked), "sentences_asked": len(jobs), "replies_formed": len(formed),
                 "kept_train": len(out.train), "kept_dev": len(out.dev),
                 "rejected_form": len(jobs) - len(formed),
                 "rejected_round_trip": len(formed) - len(out.train) - len(out.dev),
                 "round_trip_k": round_trip_k, "dev_chunks": len(held)}
    if log:
        log(f"    {len(jobs)} sentences of {len(picked)} chunks asked: {len(formed)} replies read as questions, "
            f"{len(out.train)} train and {len(out.dev)} dev questions passed the round trip (own chunk in the top "
            f"{round_trip_k})")
    return out


def llm_writer(model: str, cfg, log: Callable[[str], None] | None = None) -> Write:
    """``write`` over the base LLM with the engine the evaluation generates with (vLLM offline, greedy)."""
    from builder.evaluate_answers import generate_answers

    def write(prompts: list[str]) -> list[str]:
        batches = {"questions": [[{"role": "user", "content": p}] for p in prompts]}
        res, _ = generate_answers(cfg.eval.generation_engine, model, batches, MAX_NEW_TOKENS, cfg.serve,
                                  **({"log": log} if log else {}))
        return res["questions"]["texts"]
    return write


def ask_writer(ask, log: Callable[[str], None] | None = None) -> Write:
    """``write`` over a teacher's ``ask`` (builder.teacher), one request per prompt; a failed request is an
    empty reply (it costs a question, never the build)."""
    def write(prompts: list[str]) -> list[str]:
        out, failures = [], 0
        for p in prompts:
            try:
                out.append(ask(p, temperature=0.0, max_tokens=MAX_NEW_TOKENS))
            except Exception as exc:  # noqa: BLE001
                failures += 1
                if log and failures <= 3:
                    log(f"    teacher request failed: {exc}")
                out.append("")
        return out
    return write
