"""Chat examples for LoRA training: RAFT-style contexts from the retriever, grounded targets with citations."""

from __future__ import annotations

from dataclasses import replace

from builder import chat_examples
from core.bundle import Chunk
from core.gold import GoldMatcher
from core.prompting import REFUSAL, parse_citations


def _chunk(i: int, source: str, text: str, kind: str = "text") -> Chunk:
    return Chunk(f"c{i:03d}", source, f"Doc {source} > Part {i}", source, f"{source} > Part {i}\n{text}",
                 len(text.split()), kind)


def _corpus() -> list[Chunk]:
    chunks = []
    for d in range(6):
        for p in range(4):
            i = len(chunks)
            chunks.append(_chunk(i, f"doc{d}.md", f"Document {d} part {p} explains topic {d}-{p} in plain words. "
                                                  f"The figure for item {d}{p} is {d * 10 + p} kilograms per acre. "
                                                  "Farmers should keep records of every delivery."))
    return chunks


def _questions(chunks: list[dict], n: int = 40) -> list[dict]:
    qs = []
    for k in range(n):
        i = (k * 7) % len(chunks)
        d, p = divmod(i, 4)
        qs.append({"question": f"What is the figure for item {d}{p}? (variant {k})",
                   "answer": f"The figure for item {d}{p} is {d * 10 + p} kilograms per acre.",
                   "source": f"doc{d}.md"})
    return qs


def _rankings(questions: list[dict], chunks: list[dict], hit: bool = True) -> list[list[int]]:
    """A fake retriever: the gold chunk first (or missing), then the chunks after it."""
    out = []
    for q in questions:
        gold = GoldMatcher(chunks).gold(q)[0]
        rest = [j for j in range(len(chunks)) if j != gold]
        rest = rest[gold:] + rest[:gold]
        out.append(([gold] if hit else []) + rest[:10])
    return out


def test_answer_bearing_chunk_is_found_verbatim_and_by_overlap():
    chunks = _corpus()
    q = {"question": "x", "answer": "the figure for item 21 is 21 kilograms per acre", "source": "doc2.md"}
    assert GoldMatcher(chunks).gold(q) == [9]
    paraphrase = {"question": "x", "answer": "Item 21: twenty-one kilograms per acre, figure 21", "source": "doc2.md"}
    assert GoldMatcher(chunks).gold(paraphrase) == [9]
    assert GoldMatcher(chunks).gold({"question": "x", "answer": "unrelated words entirely", "source": None}) == []


def test_most_examples_hold_the_gold_chunk_and_cite_it_some_hold_nothing_and_refuse():
    chunks = _corpus()
    questions = _questions(chunks, 200)
    rows = chat_examples.make_chat_examples(questions, chunks, _rankings(questions, chunks), context_chunks=3,
                                       p_gold_absent=0.2, seed=3)
    assert len(rows) == len(questions)
    by_id = {c.chunk_id: c for c in chunks}
    absent = [r for r in rows if not r["gold_in_context"]]
    assert 0.1 < len(absent) / len(rows) < 0.3
    for r in rows:
        target = r["messages"][-1]
        assert target["role"] == "assistant"
        assert r["messages"][0]["role"] == "system" and "Passages:" in r["messages"][1]["content"]
        context = [by_id[i] for i in r["context_chunk_ids"]]
        assert 1 <= len(context) <= 3
        if r["gold_in_context"]:
            cited = parse_citations(target["content"], len(context))
            assert cited == r["cited"] and len(cited) == 1
            assert context[cited[0] - 1].chunk_id in r["gold_chunk_ids"]
            assert target["content"].startswith(r["answer"])
        else:
            assert target["content"] == REFUSAL
            gold_source = by_id[r["gold_chunk_ids"][0]].source
            assert all(c.source != gold_source for c in context)
            assert all(r["answer"].lower() not in c.text.lower() for c in context)


def test_gold_chunk_missed_by_the_retriever_is_put_into_the_context():
    chunks = _corpus()
    questions = _questions(chunks, 30)
    rows = chat_examples.make_chat_examples(questions, chunks, _rankings(questions, chunks, hit=False),
                                       context_chunks=4, p_gold_absent=0.0, seed=0)
    assert all(r["gold_in_context"] for r in rows)
    assert all(set(r["gold_chunk_ids"]) & set(r["context_chunk_ids"]) for r in rows)
    assert all(len(r["context_chunk_ids"]) == 4 for r in rows)
    # Not always in the first place, or the model would learn to cite [1] whatever the passages say.
    assert len({r["cited"][0] for r in rows}) > 1


def test_a_training_questions_own_qa_chunk_never_enters_its_context():
    chunks = _corpus()
    q = {"question": "What is the figure for item 10?", "answer": "The figure for item 10 is 10 kilograms per acre.",
         "source": "doc1.md"}
    own = _chunk(len(chunks), "faq.qa.jsonl", f"Q: {q['question']}\nA: {q['answer']}", kind="qa")
    chunks.append(own)
    ranking = [[len(chunks) - 1, 4, 0, 1]]
    rows = chat_examples.make_chat_examples([q], chunks, ranking, context_chunks=3, p_gold_absent=0.0, seed=0)
    assert own.chunk_id not in rows[0]["context_chunk_ids"]
    assert rows[0]["gold_chunk_ids"] == [chunks[4].chunk_id]


def _long_corpus() -> list[Chunk]:
    """The corpus with every chunk padded to ~170 words, so contexts must be cut to fit."""
    return [replace(c, text=c.text + " " + " ".join(f"filler{k}" for k in range(150))) for c in _corpus()]


def count(messages: list[dict]) -> int:
    """A stand-in token counter: words."""
    return sum(len(m["content"].split()) for m in messages)


def test_contexts_are_shortened_to_fit_max_tokens_without_touching_the_gold_passage():
    chunks = _long_corpus()
    questions = _questions(chunks, 20)
    rows = chat_examples.make_chat_examples(questions, chunks, _rankings(questions, chunks), context_chunks=3,
                                       p_gold_absent=0.0, seed=0, count=count, max_tokens=330)
    assert rows
    by_id = {c.chunk_id: c for c in chunks}
    for r in rows:
        assert count(r["messages"]) <= 330
        gold_text = by_id[r["gold_chunk_ids"][0]].text
        assert gold_text in r["messages"][1]["content"]


def test_an_example_that_cannot_fit_is_dropped_not_emptied():
    chunks = _corpus()
    questions = _questions(chunks, 5)
    rows = chat_examples.make_chat_examples(questions, chunks, _rankings(questions, chunks), context_chunks=3,
                                       p_gold_absent=0.0, seed=0,
                                       count=count, max_tokens=30)
    assert rows == []


def test_synthetic_pairs_quote_a_sentence_of_their_chunk_and_are_deterministic():
    chunks = _corpus()
    a = chat_examples.synthetic_questions(chunks, per_chunk=1, limit=10, seed=5)
    b = chat_examples.synthetic_questions(chunks, per_chunk=1, limit=10, seed=5)
    assert a == b and len(a) == 10
    assert len({q["source"] for q in a}) > 2  # spread over documents, not the first chunks only
    for q in a:
        assert q["answer"] in chunks[q["gold"][0]].text
        assert q["question"].endswith(("?", "."))


def test_template_questions_leave_the_generated_dev_chunks_alone():
    chunks = _corpus()
    held = set(range(0, len(chunks), 3))
    got = chat_examples.synthetic_questions(chunks, per_chunk=1, limit=100, seed=5, exclude=held)
    assert got and not any(q["gold"][0] in held for q in got)
    assert len(got) == len(chunks) - len(held)


def test_the_same_inputs_give_the_same_examples():
    chunks = _corpus()
    questions = _questions(chunks, 40)
    args = (questions, chunks, _rankings(questions, chunks), 3, 0.3, 9)
    assert chat_examples.make_chat_examples(*args) == chat_examples.make_chat_examples(*args)


def _cited_chunk_is_gold(row: dict) -> bool:
    n = parse_citations(row["messages"][-1]["content"])[0]
    return row["context_chunk_ids"][n - 1] in row["gold_chunk_ids"] and row["cited"] == [n]


def test_shuffled_contexts_move_the_gold_passage_and_the_citation_follows_it():
    chunks = _corpus()
    questions = _questions(chunks, 60)
    kept = chat_examples.make_chat_examples(questions, chunks, _rankings(questions, chunks), context_chunks=4,
                                       p_gold_absent=0.0, seed=1)
    shuffled = chat_examples.make_chat_examples(questions, chunks, _rankings(questions, chunks), context_chunks=4,
                                           p_gold_absent=0.0, seed=1, shuffle=1.0)
    assert {r["cited"][0] for r in kept} == {1}  # the fake retriever ranks the gold chunk first
    assert len({r["cited"][0] for r in shuffled}) == 4
    assert all(_cited_chunk_is_gold(r) for r in kept + shuffled)
    assert sorted(map(sorted, (r["context_chunk_ids"] for r in kept))) == \
        sorted(map(sorted, (r["context_chunk_ids"] for r in shuffled)))  # same passages, other order


def test_citation_is_numbered_after_distractors_are_dropped_to_fit():
    chunks = _long_corpus()
    questions = _questions(chunks, 30)
    rows = chat_examples.make_chat_examples(questions, chunks, _rankings(questions, chunks), context_chunks=4,
                                       p_gold_absent=0.0, seed=2, count=count, max_tokens=310, shuffle=1.0)
    assert rows and any(len(r["context_chunk_ids"]) < 4 for r in rows)
    assert any(r["cited"][0] > 1 for r in rows)
    assert all(_cited_chunk_is_gold(r) for r in rows)


def _focus(chunks: list[Chunk]):
    from core.focus import PassageFocus

    return PassageFocus.from_texts([c.text for c in chunks], lambda text: len(text.split()), 20, 14)


def test_training_passages_are_cut_as_serving_cuts_them_and_the_gold_one_keeps_its_answer():
    chunks = _long_corpus()
    focus = _focus(chunks)
    # The question shares its rare words with a sentence that is not the answer, so the served cut of the gold
    # passage leaves the answer out; the training example must still hold what its target quotes.
    questions = [dict(q, question=f"Which documents explain in plain words the records of every delivery ({k})?")
                 for k, q in enumerate(_questions(chunks, 12))]
    rows = chat_examples.make_chat_examples(questions, chunks, _rankings(questions, chunks), context_chunks=3,
                                            p_gold_absent=0.0, seed=0, focus=focus)
    assert rows
    by_id = {c.chunk_id: c for c in chunks}
    windowed = 0
    for r in rows:
        prompt = r["messages"][1]["content"]
        gold = by_id[r["gold_chunk_ids"][0]]
        for rank, cid in enumerate(r["context_chunk_ids"]):
            served = focus.cut(by_id[cid].text, r["question"], focus.budget(rank))
            assert served != by_id[cid].text  # every passage here is over its budget
            if cid != gold.chunk_id:
                assert served in prompt  # a distractor reads exactly as serving would show it
            elif r["answer"] not in served:
                windowed += 1
        assert r["answer"] in prompt
        assert len(prompt.split()) < sum(len(by_id[c].text.split()) for c in r["context_chunk_ids"]) / 2
    assert windowed  # the case the window is for happened


def test_a_gold_passage_whose_answer_is_paraphrased_is_cut_around_the_sentence_it_says_again():
    chunks = _long_corpus()
    focus = _focus(chunks)
    # A FAQ answer in other words than the document's. The question's words pick other sentences, so the served
    # cut leaves out the one the answer restates; the example must show that sentence (in the served form: the
    # heading line, the kept sentences, gap marks), not the chunk's first words, nor a cut without it.
    q = {"question": "Which documents explain in plain words the records of every delivery?",
         "answer": "Item 21 comes to twenty-one kilograms for each acre, figure 21.", "source": "doc2.md"}
    rows = chat_examples.make_chat_examples([q], chunks, _rankings([q], chunks), context_chunks=3,
                                            p_gold_absent=0.0, seed=0, focus=focus)
    gold = next(c for c in chunks if c.chunk_id == rows[0]["gold_chunk_ids"][0])
    restated = "The figure for item 21 is 21 kilograms per acre."
    assert restated in gold.text and restated not in focus.cut(gold.text, q["question"], focus.budget(0))
    prompt = rows[0]["messages"][1]["content"]
    assert restated in prompt
    assert focus.cut(gold.text, f"{q['question']} {q['answer']}", focus.budget(0)) in prompt


def test_a_gold_passage_whose_served_cut_holds_the_answer_is_left_as_served():
    chunks = _long_corpus()
    focus = _focus(chunks)
    questions = _questions(chunks, 12)  # the question shares the answer sentence's rare words
    rows = chat_examples.make_chat_examples(questions, chunks, _rankings(questions, chunks), context_chunks=3,
                                            p_gold_absent=0.0, seed=0, focus=focus)
    by_id = {c.chunk_id: c for c in chunks}
    assert rows
    for r in rows:
        served = focus.cut(by_id[r["gold_chunk_ids"][0]].text, r["question"], focus.budget(0))
        assert r["answer"] in served and served in r["messages"][1]["content"]
