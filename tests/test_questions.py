"""The train / dev / test split of question/answer pairs: deterministic, by the normalized question, so copies of
a question cannot straddle it."""

from __future__ import annotations

from builder.questions import split_key, split_questions, split_train_dev_test


def _pairs(n: int) -> list[dict]:
    return [{"question": f"How much fertilizer for crop number {i}?", "answer": str(i)} for i in range(n)]


def test_copies_of_a_question_fall_on_one_side_whatever_their_case_spacing_or_punctuation():
    variants = ["How much DAP per acre?", "how much dap per acre", "  How much DAP  per acre ?! ", "HOW MUCH DAP PER ACRE."]
    assert len({split_key(v) for v in variants}) == 1
    pairs = [{"question": v, "answer": "50 kg"} for v in variants] + _pairs(200)
    for seed in range(5):
        train, dev, test = split_train_dev_test(pairs, 0.2, 0.2, seed)
        sides = [name for name, part in (("train", train), ("dev", dev), ("test", test))
                 if any(split_key(p["question"]) == split_key(variants[0]) for p in part)]
        assert len(sides) == 1


def test_the_split_is_deterministic_disjoint_and_near_its_fractions():
    pairs = _pairs(2000)
    train, dev, test = split_train_dev_test(pairs, 0.2, 0.1, seed=13)
    assert (train, dev, test) == split_train_dev_test(list(pairs), 0.2, 0.1, seed=13)
    assert len(train) + len(dev) + len(test) == len(pairs)
    assert 0.17 < len(dev) / len(pairs) < 0.23 and 0.08 < len(test) / len(pairs) < 0.12
    assert not {p["question"] for p in dev} & {p["question"] for p in test}
    # The two-way split puts the same questions in its held-out part as the three-way one does in test.
    assert split_questions(pairs, 0.1, seed=13)[1] == test
