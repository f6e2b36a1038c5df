"""Retrieval-augmented chat examples for LoRA training, in the style of RAFT (Zhang et al., 2024).

Each example is the conversation serving will hold (``core.prompting.build_messages``): the system prompt,
then the question under numbered passages that the bundle's own retriever returned for it, then the target
answer. In most examples the passage that holds the answer (the "gold" chunk) is among the passages, next to
retrieved distractors, and the target quotes the answer and cites that passage ``[n]``. In a share of
``llm.p_gold_absent`` examples every chunk of the answer's document is taken out of the context, and the
target is the refusal sentence, so the model learns to decline instead of guessing. In a share of
``llm.shuffle_context`` examples (default none) the passages are put in a random order, as in RAFT. Passages are
cut to the bundle's budgets by the same query focus serving applies (``core.focus``): the adapter learns to read
what it will be shown, and the examples are about a quarter shorter (COVID-QA plain: 550 tokens, not 749).

Where the answers come from, in order of preference:
- ``question``: the supervision the folder brings (its FAQ train split and ``--questions``), answer as given;
- ``generated``: a question per chunk written by a language model from one of its sentences, which is the
  answer (``builder.generated_questions``: the teacher, or the base LLM);
- ``synthetic``: made without any model: a section heading asks about its section and the answer is a
  sentence of the chunk, quoted verbatim (short extractive targets are what a small model can learn).

Every choice is fixed by the seed and the text (hashes, not global random state), so a rebuild writes the same
file and resumes the same training run.

    python -c "from builder.chat_examples import read_examples; print(len(read_examples('bundle/data/chat_train.jsonl')))"
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from core.bundle import Chunk
from core.gold import GoldMatcher, is_own_qa_chunk
from core.hashing import stable_fraction
from core.prompting import REFUSAL, build_messages, cite
from core.text import normalize, split_header, split_sentences

TokenCount = Callable[[list[dict]], int]  # tokens of a whole conversation, chat template included
# A question's gold chunk that is not in the retrieved context is put there; the retriever's next best
# candidates fill in for chunks taken out, so more are asked for than the context holds.
EXTRA_CANDIDATES = 12
MIN_PASSAGE_WORDS = 24  # distractors are shortened to fit max_seq_len, never below this


def _prose_chunks_in_seeded_order(chunks: Sequence[Chunk], seed: int):
    """(position, chunk) for every chunk that is not a question/answer pair, in an order fixed by the seed, so
    a small limit still spreads over the documents."""
    order = sorted(range(len(chunks)), key=lambda i: stable_fraction(chunks[i].chunk_id, seed))
    return ((i, chunks[i]) for i in order if chunks[i].kind != "qa")


def synthetic_questions(chunks: Sequence[Chunk], per_chunk: int, limit: int, seed: int = 0,
                        exclude: Collection[int] = ()) -> list[dict]:
    """Extractive question/answer pairs made from the chunks alone: the question names the section (document
    title and heading) and asks what it says; the answer is one of the chunk's sentences, verbatim.

    Chunks are visited in a seeded order, so a small ``limit`` still spreads over the documents; those in
    ``exclude`` (the generated dev questions' chunks, which may gate the adapter) are skipped."""
    out: list[dict] = []
    for i, c in _prose_chunks_in_seeded_order(chunks, seed):
        if len(out) >= limit:
            break
        if i in exclude:
            continue
        sentences = split_sentences(split_header(c.text)[1].replace("\n", " "))
        sentences = [s for s in sentences if 6 <= len(s.split()) <= 45]
        if not sentences:
            continue
        rng = random.Random(f"{seed}:{c.chunk_id}")
        heading = (c.location or "").split(">")[-1].strip()
        topic = heading if heading and heading != c.title else c.title or c.source
        templates = [f"What does {c.title or c.source} say about {topic.lower()}?",
                     f"{topic}: what should I know?",
                     f"Tell me about {topic.lower()} ({c.title or c.source})."]
        for sentence in rng.sample(sentences, min(per_chunk, len(sentences))):
            out.append({"question": rng.choice(templates), "answer": sentence, "source": c.source,
                        "origin": "synthetic", "gold": [i]})
            if len(out) >= limit:
                break
    return out


def template_sample(chunks: Sequence[Chunk], n: int = 20, seed: int = 0) -> list[dict]:
    """Up to n of the template questions above, one per chunk: what generated questions replace (report card)."""
    return [{"question": q["question"], "answer": q["answer"], "source": q["source"]}
            for q in synthetic_questions(chunks, 1, n, seed)]


def _passage(chunk: Chunk) -> dict:
    return {"text": chunk.text, "source": chunk.source, "location": chunk.location}


def _shorten(text: str, words: int) -> str:
    parts = text.split()
    return text if len(parts) <= words else " ".join(parts[:words]) + " ..."


def fit_context(question: str, passages: list[dict], answer: str, keep: set[int], count: TokenCount,
                max_tokens: int) -> list[dict] | None:
    """Shorten passages (longest distractor first, never below MIN_PASSAGE_WORDS words), then drop
    distractors from the end, until the conversation fits ``max_tokens``; None when even that fails.
    Passages at positions in ``keep`` (the gold ones) are never touched."""
    passages = [dict(p) for p in passages]

    def size(ps: list[dict]) -> int:
        return count(build_messages(question, ps) + [{"role": "assistant", "content": answer}])

    total = size(passages)
    for _ in range(12):
        if total <= max_tokens:
            return passages
        free = [j for j in range(len(passages)) if j not in keep
                and len(passages[j]["text"].split()) > MIN_PASSAGE_WORDS]
        if not free:
            break
        j = max(free, key=lambda k: len(passages[k]["text"].split()))
        n = len(passages[j]["text"].split())
        over_words = int((total - max_tokens) * 0.8) + 1  # roughly 1.3 tokens per word
        passages[j]["text"] = _shorten(passages[j]["text"], max(MIN_PASSAGE_WORDS, n - over_words))
        total = size(passages)
    while total > max_tokens and len(passages) > 1:
        drop = [j for j in range(len(passages)) if j not in keep]
        if not drop:
            break
        passages.pop(drop[-1])
        keep = {k - 1 if k > drop[-1] else k for k in keep}
        total = size(passages)
    for _ in range(8):  # last resort: the gold passage itself, cut to a window around the answer
        if total <= max_tokens:
            return passages
        j = max(keep or range(len(passages)), key=lambda k: len(passages[k]["text"].split()))
        n = len(passages[j]["text"].split())
        if n <= MIN_PASSAGE_WORDS:
            return None
        target = max(MIN_PASSAGE_WORDS, n - int((total - max_tokens) * 0.8) - 1)
        passages[j]["text"] = _window(passages[j]["text"], answer, target)
        total = size(passages)
    return passages if total <= max_tokens else None


def _window(text: str, answer: str, words: int) -> str:
    """About ``words`` words of ``text`` around where ``answer`` starts (its first words), else its beginning."""
    parts = text.split()
    if len(parts) <= words:
        return text
    probe = [w.lower() for w in answer.split()[:4]]
    lowered = [w.lower() for w in parts]
    start = next((i for i in range(len(parts)) if probe and lowered[i:i + len(probe)] == probe), 0)
    begin = max(0, min(start - words // 4, len(parts) - words))
    piece = " ".join(parts[begin:begin + words])
    return ("... " if begin else "") + piece + (" ..." if begin + words < len(parts) else "")


def focused(focus, question: str, passages: list[dict], answer: str, keep: set[int]) -> list[dict]:
    """The passages cut as serving cuts them (``core.focus.PassageFocus``), so the adapter trains on what it
    will read. A gold passage (position in ``keep``) whose served cut holds less of the answer's words than the
    whole passage does is cut again, the same way, for the question and the answer together, so the target
    draws on what its context shows: a verbatim answer's sentences, or those a FAQ answer says in other words
    (at 280c12a: 31 of knowledge/'s 192 examples, 17 of 308 for COVID-QA as a plain folder, 262 of 825 with its
    questions, whose words often miss the answer's sentence). Should that cut still lose an answer the passage
    holds verbatim (one longer than the budget), the passage is the window of its budget's size around it."""
    cut = focus.apply(question, passages)
    wanted = normalize(answer)
    answer_terms = focus.stats.terms(answer)
    for j in keep:
        text = passages[j]["text"]
        kept = focus.shared_weight(answer_terms, focus.stats.terms(cut[j]["text"]))
        if kept < focus.shared_weight(answer_terms, focus.stats.terms(text)):
            cut[j]["text"] = focus.cut(text, f"{question} {answer}", focus.budget(j))
        if wanted in normalize(text) and wanted not in normalize(cut[j]["text"]):
            words = max(MIN_PASSAGE_WORDS, focus.budget(j) * 3 // 4)  # about 0.75 words per LLM token
            cut[j]["text"] = _window(text, answer, words)
    return cut


def make_chat_examples(questions: Sequence[dict], chunks: Sequence[Chunk], rankings: Sequence[Sequence[int]],
                       context_chunks: int, p_gold_absent: float, seed: int = 0,
                       count: TokenCount | None = None, max_tokens: int | None = None,
                       shuffle: float = 0.0, focus=None) -> list[dict]:
    """One chat example per question that some chunk answers.

    ``questions``: {"question", "answer", "source"?, "origin"?, "gold"? (chunk positions, else found here)};
    ``rankings``: the retriever's chunk positions for each question, best first (``Retriever.rank``);
    ``shuffle``: share of examples whose passages are put in a random (seeded) order;
    ``focus``: the bundle's passage focus (``core.focus.PassageFocus``), applied as serving applies it.
    Returns rows {"messages", "question", "answer", "origin", "gold_in_context", "cited", "context_chunk_ids",
    "gold_chunk_ids"}; the last message is the assistant's target.
    """
    matcher = GoldMatcher(chunks)
    by_source, norm_texts = matcher.by_source, matcher.norm
    out: list[dict] = []
    for q, ranking in zip(questions, rankings):
        gold = list(q.get("gold") or matcher.gold(q))
        if not gold:
            continue
        key = f"{q['question']}\n{q['answer']}"
        rng = random.Random(f"{seed}:chat:{key}")
        absent = stable_fraction(key, seed + 1) < p_gold_absent
        own = {i for i in ranking if is_own_qa_chunk(q["question"], chunks[i])}
        if absent:
            # Nothing that could hold the answer: no chunk of its document, none containing its words.
            answer_norm = normalize(q["answer"])
            banned = set(gold) | set(by_source.get(chunks[gold[0]].source, [])) | own
            context = [i for i in ranking if i not in banned and answer_norm not in norm_texts[i]][:context_chunks]
            target = REFUSAL
            cited: list[int] = []
        else:
            context = [i for i in ranking if i not in own][:context_chunks]
            if not any(g in context for g in gold):
                # The retriever missed it: the gold chunk takes a random place, as it might at serving time.
                pos = rng.randrange(min(len(context), context_chunks - 1) + 1) if context else 0
                context = (context[:pos] + [gold[0]] + context[pos:])[:context_chunks]
        if not context:
            continue
        if stable_fraction(key, seed + 2) < shuffle:
            rng.shuffle(context)
        if not absent:
            target = cite(q["answer"], 1)  # the marker's width is what counts for fitting; renumbered below
        passages = [dict(_passage(chunks[i]), _at=j) for j, i in enumerate(context)]
        keep = {j for j, i in enumerate(context) if i in gold}
        if focus is not None and focus.enabled:
            passages = focused(focus, q["question"], passages, q["answer"], keep)
        if count is not None and max_tokens:
            fitted = fit_context(q["question"], passages, target, keep, count, max_tokens)
            if fitted is None:
                continue
            context = [context[p["_at"]] for p in fitted]  # distractors may have been dropped anywhere
            passages = fitted
        passages = [{k: v for k, v in p.items() if k != "_at"} for p in passages]
        if not absent:
            cited = [next(j for j, i in enumerate(context) if i in gold) + 1]
            target = cite(q["answer"], cited[0])
        messages = build_messages(q["question"], passages) + [{"role": "assistant", "content": target}]
        out.append({"messages": messages, "question": q["question"], "answer": q["answer"],
                    "origin": q.get("origin") or "question", "gold_in_context": not absent, "cited": cited,
                    "context_chunk_ids": [chunks[i].chunk_id for i in context],
                    "gold_chunk_ids": [chunks[i].chunk_id for i in gold]})
    return out


def write_examples(rows: Sequence[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path


def read_examples(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def build_chat_data(cfg, chunks: Sequence[Chunk], train_questions: Sequence[dict], retriever, out_path: Path,
                    count: TokenCount | None = None, wanted: int | None = None,
                    generated: Sequence[dict] = (), exclude: Collection[int] = (), focus=None) -> list[dict]:
    """The build's chat data: supervised questions first, then the generated training questions
    (builder.generated_questions), then template pairs, up to ``wanted`` examples (what training will consume),
    contexts from ``retriever`` cut by ``focus`` as serving cuts them; written to ``out_path`` (JSONL)."""
    llm, dg = cfg.llm, cfg.datagen
    wanted = wanted if wanted is not None else llm.max_steps * llm.batch_size
    pool: list[dict] = [dict(q, origin="question") for q in train_questions]
    pool += list(generated)[:max(0, wanted - len(pool))]
    short = max(0, wanted - len(pool))
    if short:
        pool += synthetic_questions(chunks, max(1, dg.synthetic_per_chunk), min(short, dg.max_synthetic), cfg.seed,
                                    exclude)
    rankings = [[i for i, _ in r] for r in _rank_all(retriever, [q["question"] for q in pool],
                                                      llm.context_chunks + EXTRA_CANDIDATES)]
    rows = make_chat_examples(pool, chunks, rankings, llm.context_chunks, llm.p_gold_absent, cfg.seed,
                              count=count, max_tokens=llm.max_seq_len, shuffle=llm.shuffle_context, focus=focus)
    write_examples(rows, out_path)
    return rows


def _rank_all(retriever, queries: list[str], k: int, batch: int = 128) -> list:
    out: list = []
    for start in range(0, len(queries), batch):
        out.extend(retriever.rank(queries[start:start + batch], k))
    return out


def summarize(rows: Sequence[dict]) -> dict:
    """Counts for the manifest: examples by origin and how many lack the answer."""
    origins: dict[str, int] = {}
    for r in rows:
        origins[r["origin"]] = origins.get(r["origin"], 0) + 1
    return {"examples": len(rows), "by_origin": origins,
            "gold_absent": sum(1 for r in rows if not r["gold_in_context"])}
