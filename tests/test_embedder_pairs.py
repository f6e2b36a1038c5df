"""Embedder training pairs from a small knowledge folder: supervision, synthetic queries, hard negatives.

A one-hot keyword encoder stands in for the base embedder, so which chunk is "hard" is known in advance.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from builder import chunk as chunk_stage
from builder import embedder_pairs, generated_questions, ingest
from builder.questions import read_questions
from core.config import ChunkConfig, IngestConfig, load_config
from core.text import normalize

KEYWORDS = ["maize", "beans", "fertilizer", "dap", "can", "spacing", "weeding", "harvest", "storage", "aphids"]


def keyword_encoder(texts):
    """One dimension per keyword (plus one so no row is all zeros), L2-normalized."""
    rows = []
    for t in texts:
        words = set(re.findall(r"[a-z]+", t.lower()))
        v = np.array([1.0 if k in words else 0.0 for k in KEYWORDS] + [0.1])
        rows.append(v / np.linalg.norm(v))
    return np.array(rows, dtype=np.float32)


def word_counter(texts):
    return [len(t.split()) + 2 for t in texts]


MAIZE = """# Maize guide

## Planting

Plant maize at the start of the long rains. Use a spacing of 75 cm by 25 cm for hybrid maize seed.

## Fertilizer

Apply 50 kg of DAP fertilizer per acre at planting time for maize. Top dress maize with CAN fertilizer at knee height.

## Weeding

Weed maize twice: three weeks after emergence and again before top dressing with fertilizer.
"""

BEANS = """# Beans guide

## Fertilizer

Beans need little nitrogen fertilizer. Apply DAP fertilizer at planting only on poor soils for beans.

## Pests

Spray aphids on beans with a recommended insecticide when colonies appear under the leaves.

## Harvest

Harvest beans when most pods are dry, then thresh and dry the grain for storage.
"""

QA = [
    {"question": "How much DAP per acre for maize?", "answer": "Apply 50 kg of DAP fertilizer per acre",
     "source": "maize.md"},
    # a paraphrase: the words are in the weeding section, the sentence is not
    {"question": "How often should I weed my maize?", "answer": "Twice: three weeks after emergence, then before "
     "top dressing.", "source": "maize.md"},
    # no source and no chunk anywhere holds anything like it
    {"question": "What is the price of a tractor?", "answer": "Ask the cooperative office for quotations.",
     "source": None},
]


@pytest.fixture()
def kb(tmp_path) -> Path:
    root = tmp_path / "kb"
    root.mkdir()
    (root / "maize.md").write_text(MAIZE)
    (root / "beans.md").write_text(BEANS)
    return root


@pytest.fixture()
def chunks(kb) -> list[dict]:
    res = ingest.run(IngestConfig(), kb, log=lambda _: None)
    cfg = ChunkConfig(max_tokens=40, overlap_tokens=0, min_tokens=4)
    return list(chunk_stage.run(cfg, res.documents, word_counter))


def position(chunks, needle: str) -> int:
    hits = [i for i, c in enumerate(chunks) if needle.lower() in c.text.lower()]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def test_question_is_paired_with_the_chunk_that_holds_its_answer(chunks):
    pairs, unmatched = embedder_pairs.question_pairs(QA[:1], chunks)
    assert unmatched == []
    (p,) = pairs
    assert p.positive == position(chunks, "50 kg of DAP")
    assert p.exact and p.kind == "question" and p.source == "maize.md"
    assert "apply 50 kg of dap fertilizer per acre" in chunks[p.positive].text.lower()


def test_paraphrased_answer_is_matched_by_word_overlap_within_its_source(chunks):
    pairs, _ = embedder_pairs.question_pairs(QA[1:2], chunks)
    (p,) = pairs
    assert not p.exact
    assert p.positive == position(chunks, "Weed maize twice")
    assert p.relevant == [p.positive]


def test_question_nobody_answers_is_reported_unmatched(chunks):
    pairs, unmatched = embedder_pairs.question_pairs(QA[2:], chunks)
    assert pairs == [] and unmatched == QA[2:]


def test_heading_and_title_queries_ask_for_their_own_section(chunks):
    pairs = embedder_pairs.heading_pairs(chunks)
    queries = {p.query: p for p in pairs}
    assert "Maize guide: Weeding" in queries and "Beans guide: Pests" in queries
    weeding = queries["Maize guide: Weeding"]
    assert chunks[weeding.positive].location.endswith("Weeding")
    assert all(chunks[i].location == chunks[weeding.positive].location for i in weeding.relevant)
    assert {p.kind for p in pairs} <= {"heading", "title"}


def test_inverse_cloze_query_is_a_sentence_cut_from_its_positive(chunks):
    pos = position(chunks, "Top dress maize")
    sentence = "Top dress maize with CAN fertilizer at knee height."
    p = embedder_pairs.ict_pair(chunks, pos, sentence, keep=False)
    assert p.query == sentence and p.kind == "ict"
    assert sentence not in p.positive_text
    assert "Apply 50 kg of DAP" in p.positive_text  # the rest of the chunk stays
    assert p.positive_text.split("\n")[0] == chunks[pos].text.split("\n")[0]  # and so does the title line
    kept = embedder_pairs.ict_pair(chunks, pos, sentence, keep=True)
    assert sentence in kept.positive_text


def test_synthetic_pairs_respect_the_limit_and_skip_supervised_chunks_first(chunks):
    all_pairs = embedder_pairs.synthetic_pairs(chunks, per_chunk=1, limit=1000, supervised={})
    kinds = {p.kind for p in all_pairs}
    assert {"heading", "ict"} <= kinds <= {"heading", "title", "ict"}
    assert len(embedder_pairs.synthetic_pairs(chunks, per_chunk=1, limit=3, supervised={})) == 3
    busy = position(chunks, "50 kg of DAP")
    pairs = embedder_pairs.synthetic_pairs(chunks, per_chunk=1, limit=1000, supervised={busy: 1})
    assert not [p for p in pairs if p.kind == "ict" and p.positive == busy]


def test_hard_negatives_are_similar_chunks_that_do_not_hold_the_answer(chunks):
    """The beans fertilizer chunk shares the query's keywords but not its answer: a true hard negative. A copy of
    the answer sentence planted in the beans harvest chunk makes that chunk a false negative, to be dropped."""
    harvest = position(chunks, "Harvest beans when")
    chunks[harvest] = replace(chunks[harvest], text=chunks[harvest].text
                              + " Apply 50 kg of DAP fertilizer per acre at planting time for maize.")
    pairs, _ = embedder_pairs.question_pairs([dict(QA[0], source=None)], chunks)
    ranker = embedder_pairs.BaseRanker(chunks, keyword_encoder, keyword_encoder([c.text for c in chunks]))
    dropped = embedder_pairs.mine_hard_negatives(pairs, chunks, ranker, n=2)
    (p,) = pairs
    beans_fertilizer = position(chunks, "Beans need little nitrogen")
    assert harvest in p.relevant  # the answer is there, so it is relevant, never a negative
    assert harvest not in p.negatives and p.positive not in p.negatives
    assert beans_fertilizer in p.negatives
    assert dropped["relevant"] >= 1
    norm = normalize(p.answer)
    assert all(norm not in normalize(chunks[i].text) for i in p.negatives)


def test_answer_string_filters_negatives_outside_the_relevant_set(chunks):
    """A chunk from another document that holds the answer is not relevant to a sourced question, yet it is
    still no negative."""
    harvest = position(chunks, "Harvest beans when")
    chunks[harvest] = replace(chunks[harvest], text=chunks[harvest].text
                              + " Apply 50 kg of DAP fertilizer per acre at planting time for maize.")
    pairs, _ = embedder_pairs.question_pairs(QA[:1], chunks)
    ranker = embedder_pairs.BaseRanker(chunks, keyword_encoder, keyword_encoder([c.text for c in chunks]))
    dropped = embedder_pairs.mine_hard_negatives(pairs, chunks, ranker, n=len(chunks))
    assert harvest not in pairs[0].relevant and harvest not in pairs[0].negatives
    assert dropped["contains_answer"] >= 1


def fake_writer(prompts):
    """Stands in for the LLM: a good question for a sentence about DAP, and otherwise, in turn, a question about
    the prompt and a question about DAP that merely borrows a word of the sentence (the round trip must reject
    it: the DAP chunk comes back, not the sentence's own)."""
    out = []
    for n, p in enumerate(prompts):
        sentence = p.rsplit("Sentence:", 1)[1].split("Question:")[0]
        if "DAP" in sentence:
            out.append("How much DAP fertilizer for maize?\nExtra line the writer added.")
        elif n % 2:
            out.append("What is the answer to this sentence?")
        else:
            out.append(f"Question: How much DAP fertilizer for maize {sentence.split()[-1].strip('.')}?")
    return out


def test_generated_questions_keep_only_those_that_read_as_questions_and_find_their_chunk(chunks):
    ranker = embedder_pairs.BaseRanker(chunks, keyword_encoder, keyword_encoder([c.text for c in chunks]))
    got = generated_questions.generate(chunks, fake_writer, ranker.rank, limit=100, per_chunk=1,
                                       dev_fraction=0.0, round_trip_k=1)
    assert got.train and not got.dev
    for q in got.train:  # its chunk comes back first, and the answer is a sentence of that chunk
        assert ranker.rank([q["question"]], 1)[0] == q["gold"]
        assert q["origin"] == "generated" and q["answer"] in chunks[q["gold"][0]].text
        assert not q["question"].startswith("Question:")
    st = got.stats
    assert st["rejected_form"] >= 1 and st["rejected_round_trip"] >= 1
    assert st["chunks_asked"] == st["sentences_asked"] == st["replies_formed"] + st["rejected_form"]


def test_a_reply_that_copies_the_prompts_example_or_the_sentence_is_not_a_question():
    sentence = "The clinic is closed on Sundays and after six in the evening."
    assert generated_questions.clean_question("When is the clinic closed?", sentence) == "When is the clinic closed?"
    assert generated_questions.clean_question("Question: 1. When is the clinic closed?", sentence)
    for reply in ("When is the museum closed on Sundays?",  # the example's subject, not the sentence's
                  "The clinic is closed on Sundays and after six in the evening?",  # the sentence copied
                  "What does the sentence say about the clinic?",  # about the prompt
                  "When is it?", "The clinic is closed.", "How do I bake bread at home?"):
        assert generated_questions.clean_question(reply, sentence) is None, reply


def test_several_questions_per_chunk_come_from_different_sentences_round_by_round(chunks):
    seen = []

    def writer(prompts):
        seen.extend(p.rsplit("Sentence:", 1)[1].split("Question:")[0].strip() for p in prompts)
        return fake_writer(prompts)

    ranker = embedder_pairs.BaseRanker(chunks, keyword_encoder, keyword_encoder([c.text for c in chunks]))
    got = generated_questions.generate(chunks, writer, ranker.rank, limit=100, per_chunk=3, dev_fraction=0.0,
                                       round_trip_k=len(chunks))
    owners = [next(i for i, c in enumerate(chunks) if s in c.text) for s in seen]
    per_chunk = {i: [s for s, o in zip(seen, owners) if o == i] for i in set(owners)}
    assert max(len(v) for v in per_chunk.values()) > 1, "some chunk has several usable sentences"
    assert all(len(v) == len(set(v)) <= 3 for v in per_chunk.values())
    # Every chunk's first question comes before any chunk's second: a budget cut keeps the coverage.
    firsts = [k for k, o in enumerate(owners) if owners.index(o) == k]
    assert firsts == list(range(len(firsts)))
    st = got.stats
    assert st["chunks_asked"] == len(per_chunk) and st["sentences_asked"] == len(seen)


def test_generated_dev_questions_come_from_held_out_chunks_and_the_other_prompt(chunks):
    seen = []

    def writer(prompts):
        seen.extend(prompts)
        return fake_writer(prompts)

    ranker = embedder_pairs.BaseRanker(chunks, keyword_encoder, keyword_encoder([c.text for c in chunks]))
    got = generated_questions.generate(chunks, writer, ranker.rank, limit=100, per_chunk=2, dev_fraction=0.5,
                                       round_trip_k=3)
    assert got.dev_chunks and got.dev_chunks == generated_questions.dev_chunks(chunks, 0.5, 0)
    assert all(q["gold"][0] in got.dev_chunks for q in got.dev)
    assert all(q["gold"][0] not in got.dev_chunks for q in got.train)
    train_prompt = generated_questions.PROMPTS["train"].split("{")[0]
    dev_prompt = generated_questions.PROMPTS["dev"].split("{")[0]
    assert any(p.startswith(dev_prompt) for p in seen) and any(p.startswith(train_prompt) for p in seen)


def test_make_embedder_pairs_trains_generated_questions_and_no_pair_on_a_dev_chunk(chunks):
    cfg = load_config("tiny", overrides=["datagen.hard_negatives=1"])
    ranker = embedder_pairs.BaseRanker(chunks, keyword_encoder, keyword_encoder([c.text for c in chunks]))
    dap = position(chunks, "50 kg of DAP")
    generated = [{"question": "How much DAP fertilizer for maize?", "source": chunks[dap].source, "gold": [dap],
                  "answer": "Apply 50 kg of DAP fertilizer per acre at planting time for maize."}]
    pairs, stats = embedder_pairs.make_embedder_pairs(cfg, chunks, QA, ranker, generated)
    assert stats["question"] == 2 and stats["unmatched_questions"] == 1
    assert stats["generated"] == 1 and stats["ict"] >= 1
    assert stats["pairs"] == len(pairs) == sum(stats[k] for k in embedder_pairs.KINDS)
    assert all(len(p.negatives) <= 1 for p in pairs)
    held = {dap, position(chunks, "Weed maize twice")}
    pairs, stats = embedder_pairs.make_embedder_pairs(cfg, chunks, [], ranker, generated, exclude=held)
    assert stats["generated"] == 0 and not any(p.positive in held for p in pairs)


def test_split_pairs_is_deterministic_and_complete(chunks):
    pairs = embedder_pairs.synthetic_pairs(chunks, per_chunk=2, limit=1000, supervised={})
    train, held = embedder_pairs.split_pairs(pairs, 0.3, seed=1)
    again = embedder_pairs.split_pairs(list(reversed(pairs)), 0.3, seed=1)
    assert {p.query for p in held} == {p.query for p in again[1]}
    assert len(train) + len(held) == len(pairs) and held and train


def test_pairs_file_lists_splits_and_chunk_ids(chunks, tmp_path):
    pairs, _ = embedder_pairs.question_pairs(QA[:2], chunks)
    path = embedder_pairs.write_pairs(tmp_path / "pairs.jsonl", pairs[:1], pairs[1:], chunks)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["split"] for r in rows] == ["train", "eval"]
    assert rows[0]["positive_chunk_id"] == chunks[pairs[0].positive].chunk_id
    assert rows[0]["answer"] == QA[0]["answer"] and rows[0]["source"] == "maize.md"


def test_read_questions_names_the_bad_line(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "a?", "answer": "b"}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"q.jsonl:3"):
        read_questions(f)
