"""Chunking respects structure, fits the embedder's input, overlaps, and keeps ids stable."""

from __future__ import annotations

import itertools

from builder.chunk import run as chunk
from builder.ingest import Block, Document
from core.config import ChunkConfig


def word_counter(texts):
    return [len(t.split()) + 2 for t in texts]  # a whitespace "tokenizer" with [CLS]/[SEP]


def doc(blocks, source="guide.md", title="Guide"):
    return Document(source, title, "markdown", blocks, "0" * 64)


def test_sections_never_mix_and_each_chunk_carries_its_heading_path():
    d = doc([Block("Plant at the onset of rains.", ("Guide", "Planting")),
             Block("Dry grain to 13 percent moisture.", ("Guide", "Storage"))])
    chunks = chunk(ChunkConfig(max_tokens=50, overlap_tokens=5, min_tokens=1), [d], word_counter)
    assert [c.text for c in chunks] == ["Guide > Planting\nPlant at the onset of rains.",
                                        "Guide > Storage\nDry grain to 13 percent moisture."]
    assert chunks[1].location == "Guide > Storage"


def test_long_sections_split_under_the_limit_with_sentence_overlap():
    sentences = [f"Sentence number {i} talks about soil." for i in range(40)]
    d = doc([Block(" ".join(sentences), ("Guide", "Soil"))])
    cfg = ChunkConfig(max_tokens=40, overlap_tokens=8, min_tokens=3)
    chunks = chunk(cfg, [d], word_counter)
    assert len(chunks) > 3
    assert all(c.n_tokens <= cfg.max_tokens for c in chunks)
    for a, b in itertools.pairwise(chunks):
        last_sentence_of_a = a.text.splitlines()[-1].split(". ")[-1]
        assert last_sentence_of_a.rstrip(".") in b.text, "consecutive chunks should share a sentence"
    covered = " ".join(c.text for c in chunks)
    assert all(s in covered for s in sentences)


def test_an_over_long_sentence_is_cut_into_windows():
    words = [f"w{i}" for i in range(300)]
    d = doc([Block(" ".join(words), ("Guide",))])
    chunks = chunk(ChunkConfig(max_tokens=64, overlap_tokens=0, min_tokens=1), [d], word_counter)
    assert all(c.n_tokens <= 64 for c in chunks)
    seen = [w for c in chunks for w in c.text.split("\n", 1)[1].split()]
    assert seen == words


def test_question_answer_pairs_stand_alone():
    d = doc([Block("Q: a?\nA: b.", ("FAQ", "a?"), kind="qa"), Block("Q: c?\nA: d.", ("FAQ", "c?"), kind="qa")],
            source="faq.qa.jsonl", title="FAQ")
    chunks = chunk(ChunkConfig(max_tokens=100, overlap_tokens=10, min_tokens=1), [d], word_counter)
    assert len(chunks) == 2


def test_ids_are_stable_and_depend_on_source_and_text():
    blocks = [Block("Beans fix nitrogen.", ("Guide",))]
    cfg = ChunkConfig(max_tokens=50, overlap_tokens=5, min_tokens=1)
    a = chunk(cfg, [doc(blocks)], word_counter)[0].chunk_id
    b = chunk(cfg, [doc(blocks)], word_counter)[0].chunk_id
    c = chunk(cfg, [doc(blocks, source="other.md")], word_counter)[0].chunk_id
    assert a == b != c


def test_chunks_fit_even_when_joining_costs_more_tokens_than_the_parts():
    # A tokenizer whose count grows faster than the sum of its parts (as sub-word joins can): the packer's
    # estimate runs over, and the final check must split until every chunk really fits.
    def superlinear(texts):
        return [2 + len(t.split()) + len(t.split()) ** 2 // 40 for t in texts]

    sentences = [f"Sentence {i} has exactly seven words here." for i in range(30)]
    d = doc([Block(" ".join(sentences), ("Guide", "Soil"))])
    cfg = ChunkConfig(max_tokens=60, overlap_tokens=0, min_tokens=1)
    chunks = chunk(cfg, [d], superlinear)
    assert all(c.n_tokens <= cfg.max_tokens for c in chunks)
    assert all(superlinear([c.text])[0] == c.n_tokens for c in chunks)
    body = " ".join(c.text.split("\n", 1)[1] for c in chunks)
    assert body.split() == " ".join(sentences).split()  # nothing lost, nothing repeated, order kept
