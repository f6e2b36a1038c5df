"""The embedder stage: training with sentence-transformers' trainer, and the promotion gate that keeps the base
embedder unless fine-tuning retrieves better on held-out pairs. A random tiny BERT keeps each test to seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder import chunk as chunk_stage
from builder import embedder, embedder_pairs, generated_questions, ingest
from core.config import ChunkConfig, IngestConfig, load_config
from core.hashing import file_sha256
from core.models import build_tiny_bert
from core.retrieval import encode_texts
from core.text import normalize

KNOWLEDGE = Path(__file__).resolve().parent.parent / "knowledge"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the CPU is shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chunks() -> list[dict]:
    res = ingest.run(IngestConfig(), KNOWLEDGE / "crops", log=lambda _: None)
    docs = [d for d in res.documents if d.source in ("maize.md", "beans.md")]
    assert docs, "knowledge/crops lacks maize.md and beans.md"
    cfg = ChunkConfig(max_tokens=60, overlap_tokens=0, min_tokens=8)
    return list(chunk_stage.run(cfg, docs, lambda ts: [len(t.split()) + 2 for t in ts]))


@pytest.fixture(scope="module")
def base_model(chunks, tmp_path_factory) -> Path:
    return build_tiny_bert([c.text for c in chunks], tmp_path_factory.mktemp("base") / "tiny-bert", seed=3)


def same_model(copy: Path, original: Path) -> bool:
    """Every file of the bundle's embedder folder is byte-identical to the original's."""
    files = [p.relative_to(copy) for p in copy.rglob("*") if p.is_file()]
    return bool(files) and all(file_sha256(copy / f) == file_sha256(original / f) for f in files)


def tiny_cfg(*overrides: str):
    return load_config("tiny", overrides=["embedder.max_pairs=96", "embedder.batch_size=16",
                                          "embedder.eval_fraction=0.3", "datagen.max_synthetic=96", *overrides])


def test_gate_keeps_the_base_embedder_when_training_learns_nothing(chunks, base_model, tmp_path):
    cfg = tiny_cfg("embedder.learning_rate=0")
    info = embedder.run(cfg, base_model, chunks, [], tmp_path)
    assert info["finetuned"] is False
    assert info["decision"].startswith("kept the base embedder")
    assert info["gate"]["finetuned"]["mrr@10"] == pytest.approx(info["gate"]["base"]["mrr@10"], abs=1e-6)
    assert same_model(tmp_path / "embedder", base_model)
    assert info["training"]["steps"] > 0 and info["training"]["learning_rate"] == 0
    rows = [json.loads(line) for line in (tmp_path / embedder.PAIRS_FILE).read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "eval"}
    assert info["data"]["pairs"] == len(rows)
    assert "chunk_embeddings" in info and len(info["chunk_embeddings"]) == len(chunks)
    assert not (tmp_path / embedder.BASE_EMBEDDINGS_FILE).exists()  # only kept when a new model ships


def test_gate_keeps_the_base_when_the_gain_is_below_min_gain(chunks, base_model, tmp_path):
    cfg = tiny_cfg("embedder.learning_rate=1e-3", "embedder.min_gain=1.0",  # MRR cannot rise by a whole point
                   "embedder.recall_margin=1.0")
    info = embedder.run(cfg, base_model, chunks, [], tmp_path)
    assert info["finetuned"] is False and "min_gain 1.0" in info["decision"]
    assert info["training"]["loss_first"] is not None
    assert same_model(tmp_path / "embedder", base_model)


def test_training_moves_the_weights_with_mnrl_and_no_duplicate_batches(chunks, base_model, tmp_path):
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(base_model), device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pairs = embedder_pairs.synthetic_pairs(chunks, per_chunk=1, limit=40, supervised={})
    settings = embedder.train(model, pairs, chunks, tiny_cfg("embedder.learning_rate=1e-3"), "cpu", tmp_path)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > len(before) // 2
    assert settings["loss"] == "MultipleNegativesRankingLoss"
    assert settings["batch_sampler"] == "no_duplicates"
    assert settings["train_pairs"] == len(pairs) and settings["steps"] == -(-len(pairs) // 16)
    assert settings["hard_negatives_per_pair"] == 1


def test_large_batches_use_the_cached_loss(chunks, base_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(base_model), device="cpu")
    pairs = embedder_pairs.synthetic_pairs(chunks, per_chunk=1, limit=12, supervised={})
    cfg = tiny_cfg("embedder.batch_size=8", "embedder.cached_loss_above=4")
    assert embedder.train(model, pairs, chunks, cfg, "cpu", tmp_path)["loss"] == "CachedMultipleNegativesRankingLoss"


def test_rows_get_the_same_number_of_negatives_and_none_holds_the_answer(chunks):
    pairs, _ = embedder_pairs.question_pairs([{"question": "How deep should I plant maize seed?", "answer": "5 cm",
                                        "source": "maize.md"}], chunks)
    columns = embedder.training_rows(pairs, chunks, n_negatives=3, seed=0)
    assert list(columns) == ["anchor", "positive", "negative_1", "negative_2", "negative_3"]
    assert all("5 cm" not in columns[f"negative_{j}"][0] for j in (1, 2, 3))


def test_question_pairs_repeat_with_a_fresh_negative_while_synthetic_pairs_appear_once(chunks):
    question = embedder_pairs.EmbedderPair("How deep should I plant maize?", 0, "question", [0], answer="5 cm",
                                    negatives=[3, 4, 5])
    cloze = embedder_pairs.EmbedderPair("A sentence from chunk one.", 1, "ict", [1], negatives=[6])
    columns = embedder.training_rows([question, cloze], chunks, n_negatives=1, question_repeats=3)
    assert columns["anchor"] == [question.query] * 3 + [cloze.query]
    assert columns["negative_1"] == [chunks[i].text for i in (3, 4, 5, 6)]


def test_promotion_decision_needs_a_gain_above_min_gain():
    base = {"mrr@10": 0.40, "queries": 50.0}
    ship, why = embedder.promotion_decision(base, {"mrr@10": 0.45}, min_gain=0.0)
    assert ship and why.startswith("shipped the fine-tuned embedder") and "50" in why
    ship, why = embedder.promotion_decision(base, {"mrr@10": 0.40}, min_gain=0.0)
    assert not ship and why.startswith("kept the base embedder")
    assert not embedder.promotion_decision(base, {"mrr@10": 0.45}, min_gain=0.1)[0]
    assert not embedder.promotion_decision(base, {"mrr@10": float("nan")}, min_gain=0.0)[0]


def test_finetune_off_copies_the_base_and_says_so(chunks, base_model, tmp_path):
    info = embedder.run(tiny_cfg("embedder.finetune=false"), base_model, chunks, [], tmp_path)
    assert info["finetuned"] is False and "disabled" in info["decision"]
    assert same_model(tmp_path / "embedder", base_model)


def test_training_precision_follows_the_environment_override(monkeypatch):
    import torch

    from core.device import autocast_dtype

    monkeypatch.setenv("ASSISTANT_AUTOCAST", "off")
    assert autocast_dtype("cpu") is None
    monkeypatch.setenv("ASSISTANT_AUTOCAST", "bf16")
    assert autocast_dtype("cpu") is torch.bfloat16


def cloze_questions(chunks: list[dict], n: int) -> list[dict]:
    """Questions made from the chunks' own sentences: the answer is the sentence's last four words."""
    out = []
    for c in chunks:
        for sentence in c.text.splitlines()[1:]:
            words = sentence.split()
            if len(words) >= 10:
                out.append({"question": "What about " + " ".join(words[:5]) + "?", "answer": " ".join(words[-4:]),
                            "source": c.source})
                break
        if len(out) == n:
            break
    return out


def test_a_remined_round_trains_the_questions_on_negatives_the_trained_model_ranks_high(chunks, base_model,
                                                                                         tmp_path):
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    questions = cloze_questions(chunks, 40)  # 3 batches of 16: the first trains at 0 (linear warmup)
    pairs, unmatched = embedder_pairs.question_pairs(questions, chunks)
    assert len(pairs) > 32 and not unmatched
    cloze = embedder_pairs.synthetic_pairs(chunks, per_chunk=1, limit=4, supervised={})
    model = SentenceTransformer(str(base_model), device="cpu")
    emb = encode_texts(model, [c.text for c in chunks], autocast_device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    info, new_emb = embedder.remine_round(model, pairs + cloze, chunks, emb, tiny_cfg("embedder.learning_rate=1e-3"),
                                          "cpu")
    assert info["pairs"] == len(pairs)  # real questions only; the cloze pairs are not trained again
    assert info["steps"] == -(-len(pairs) // 16) and info["learning_rate"] == pytest.approx(5e-4)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert new_emb.shape == emb.shape and not np.allclose(new_emb, emb)
    assert all(len(p.negatives) == 0 for p in pairs)  # the caller's pairs keep their first-round negatives
    # What it mined: the trained model's best-ranked chunks that neither are the answer's chunk nor hold it.
    ranker = embedder_pairs.BaseRanker(chunks, lambda qs: embedder.encode_texts(model, qs), new_emb)
    probe = [embedder_pairs.EmbedderPair(p.query, p.positive, p.kind, p.relevant, answer=p.answer, exact=p.exact)
             for p in pairs]
    embedder_pairs.mine_hard_negatives(probe, chunks, ranker, 1)
    for p in probe:
        assert p.negatives and p.negatives[0] not in set(p.relevant) | {p.positive}
        assert normalize(p.answer) not in normalize(chunks[p.negatives[0]].text)


def test_a_remined_round_that_does_not_improve_the_held_out_split_is_undone(chunks, base_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    questions = cloze_questions(chunks, 40)
    cfg = tiny_cfg("embedder.learning_rate=1e-3", "embedder.remine_rounds=2", "embedder.remine_lr_scale=0")
    info = embedder.run(cfg, base_model, chunks, questions, tmp_path)
    rounds = info["training"]["remine"]
    assert len(rounds) == 1 and rounds[0]["kept"] is False  # learning rate 0: no gain, undone, no second round
    assert rounds[0]["heldout"]["mrr@10"] == pytest.approx(info["gate"]["finetuned"]["mrr@10"], abs=1e-6)
    if info["finetuned"]:  # the shipped model is the first round's, whose embeddings the index reuses
        shipped = SentenceTransformer(str(tmp_path / "embedder"), device="cpu")
        again = encode_texts(shipped, [c.text for c in chunks], autocast_device="cpu")
        assert abs(again - info["chunk_embeddings"]).max() < 1e-2


def test_remine_settings_must_not_be_negative_and_a_folder_without_questions_skips_the_rounds(chunks, base_model,
                                                                                               tmp_path):
    from core.config import ConfigError

    with pytest.raises(ConfigError, match="remine"):
        tiny_cfg("embedder.remine_rounds=-1")
    info = embedder.run(tiny_cfg("embedder.remine_rounds=1"), base_model, chunks, [], tmp_path)
    assert info["data"]["question"] == 0 and "remine" not in info["training"]


def grouped_rows(n_sources: int, per_source: int, repeats: int = 1):
    """A dataset of question rows: ``per_source`` questions in each of ``n_sources`` documents, each repeated,
    every text distinct except a question's anchor and positive across its repeats."""
    from datasets import Dataset

    cols: dict[str, list[str]] = {"anchor": [], "positive": [], "negative_1": []}
    info = []
    for s in range(n_sources):
        for q in range(per_source):
            for r in range(repeats):
                cols["anchor"].append(f"question {q} about document {s}?")
                cols["positive"].append(f"Document {s} passage {q} says answer-{s}-{q}.")
                cols["negative_1"].append(f"Document {s} passage {q} negative {r}.")
                info.append(embedder.RowInfo(f"doc{s}.md", r, f"answer-{s}-{q}"))
    return Dataset.from_dict(cols), info


def test_source_grouped_batches_hold_every_row_once_and_one_document_at_a_time():
    dataset, info = grouped_rows(n_sources=6, per_source=8, repeats=3)
    sampler = embedder.SourceGroupedBatchSampler(dataset, 8, False, info=info, sources=1, seed=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 18
    assert sorted(i for b in batches for i in b) == list(range(len(dataset)))
    for b in batches:
        assert len(b) == 8 and len({info[i].source for i in b}) == 1  # in-batch negatives: the same document
        texts = [t for i in b for t in (dataset[i]["anchor"], dataset[i]["positive"], dataset[i]["negative_1"])]
        assert len(texts) == len(set(texts))  # no duplicates, so a question's repeats never share a batch
    # The same order for the same seed and epoch, another one next epoch.
    again = embedder.SourceGroupedBatchSampler(dataset, 8, False, info=info, sources=1, seed=5)
    assert list(again) == batches
    again.set_epoch(1)
    assert list(again) != batches and sorted(i for b in again for i in b) == list(range(len(dataset)))

    two = list(embedder.SourceGroupedBatchSampler(dataset, 8, False, info=info, sources=2, seed=5))
    assert all(len({info[i].source for i in b}) == 2 for b in two)  # two documents open, 4 rows each


def test_source_grouped_batches_keep_apart_a_row_whose_answer_another_rows_passage_holds():
    from datasets import Dataset

    dataset = Dataset.from_dict({
        "anchor": ["when to plant?", "how deep?", "which variety?"],
        "positive": ["Plant in March once rains start.", "Sow 5 cm deep.", "Hybrid H614, sown in March."],
        "negative_1": ["Weed twice.", "Harvest dry cobs.", "Store in bags."]})
    info = [embedder.RowInfo("maize.md", 0, "in march"), embedder.RowInfo("maize.md", 0, "5 cm"),
            embedder.RowInfo("maize.md", 0, "h614")]
    batches = list(embedder.SourceGroupedBatchSampler(dataset, 3, False, info=info, sources=1, seed=0))
    # Row 2's passage holds row 0's answer: the two are never in one batch (it would be a false negative).
    assert all(not {0, 2} <= set(b) for b in batches)
    assert sorted(i for b in batches for i in b) == [0, 1, 2]


def test_training_with_source_grouped_batches_and_the_setting_checked(chunks, base_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    from core.config import ConfigError

    with pytest.raises(ConfigError, match="sources_per_batch"):
        tiny_cfg("embedder.sources_per_batch=-1")
    model = SentenceTransformer(str(base_model), device="cpu")
    pairs, _ = embedder_pairs.question_pairs(cloze_questions(chunks, 24), chunks)
    pairs += embedder_pairs.synthetic_pairs(chunks, per_chunk=1, limit=16, supervised={})
    settings = embedder.train(model, pairs, chunks, tiny_cfg("embedder.sources_per_batch=1"), "cpu", tmp_path)
    assert settings["batch_sampler"].startswith("source_grouped")
    assert settings["steps"] >= -(-settings["train_rows"] // 16) and settings["loss_last"] is not None


def test_the_tiny_embedder_gets_the_same_vocabulary_on_every_build(chunks, tmp_path):
    """Chunk boundaries are counted in the base embedder's tokens: a vocabulary that changed from build to
    build (tokenizers' WordPiece trainer breaks ties in hash order) changed the chunks and their ids."""
    texts = [c.text for c in chunks]
    first = build_tiny_bert(texts, tmp_path / "a", seed=3)
    second = build_tiny_bert(texts, tmp_path / "b", seed=3)
    vocab = [json.loads((d / "tokenizer.json").read_text())["model"]["vocab"] for d in (first, second)]
    assert vocab[0] == vocab[1] and "maize" in vocab[0]


def test_promotion_decision_refuses_a_fine_tune_that_buys_the_top_hit_with_depth():
    base = {"mrr@10": 0.40, "recall@10": 0.80, "recall@20": 0.90, "queries": 50.0}
    deeper = {"mrr@10": 0.46, "recall@10": 0.64, "recall@20": 0.90}
    ship, why = embedder.promotion_decision(base, deeper, min_gain=0.0, recall_margin=0.01)
    assert not ship and "lost recall at depth" in why and "recall@10 0.6400 vs base 0.8000" in why
    within = {"mrr@10": 0.46, "recall@10": 0.795, "recall@20": 0.90}
    assert embedder.promotion_decision(base, within, min_gain=0.0, recall_margin=0.01)[0]


def lexical_writer(prompts):
    """Stands in for the LLM: asks about the last words of the sentence it is shown (a question that copies the
    passage's words, as a small model's often do)."""
    out = []
    for p in prompts:
        words = p.rsplit("Sentence:", 1)[1].split("Question:")[0].split()
        out.append("What should I know about " + " ".join(words[-6:]).rstrip(".") + "?")
    return out


def test_a_harmful_fine_tune_is_kept_out_by_generated_dev_questions(tmp_path, monkeypatch):
    """No real question anywhere: the folder's documents only (knowledge/ without its FAQ), the fine-tune made
    harmful on purpose (every training query paired with another query's passage), and the gate, deciding on
    the generated dev questions, keeps the base embedder."""
    res = ingest.run(IngestConfig(), KNOWLEDGE, log=lambda _: None)
    docs = [d for d in res.documents if not d.source.startswith("faq/")]
    assert docs and not any(b.kind == "qa" for d in docs for b in d.blocks)
    chunks = list(chunk_stage.run(ChunkConfig(max_tokens=60, overlap_tokens=0, min_tokens=8), docs,
                                  lambda ts: [len(t.split()) + 2 for t in ts]))
    base_model = build_tiny_bert([c.text for c in chunks], tmp_path / "tiny-bert", seed=3)
    cfg = tiny_cfg("embedder.learning_rate=2e-3", "embedder.max_pairs=400", "datagen.max_synthetic=400")
    ranker = embedder.base_ranker(cfg, base_model, chunks)
    generated = generated_questions.generate(chunks, lexical_writer, ranker.rank, limit=1000, per_chunk=1,
                                             dev_fraction=0.3, round_trip_k=5)
    assert len(generated.dev) >= embedder.GATE_MIN_QUESTIONS and generated.train

    real = embedder_pairs.make_embedder_pairs

    def shuffled(*args, **kwargs):
        pairs, stats = real(*args, **kwargs)
        texts = [p.text(args[1]) for p in pairs]
        for p, t in zip(pairs, texts[7:] + texts[:7]):
            p.positive_text = t
        return pairs, stats

    monkeypatch.setattr(embedder_pairs, "make_embedder_pairs", shuffled)
    info = embedder.run(cfg, base_model, chunks, [], tmp_path / "bundle", ranker=ranker, generated=generated)
    assert info["gate"]["on"] == generated_questions.GENERATED_DEV
    assert info["gate"]["finetuned"]["mrr@10"] < info["gate"]["base"]["mrr@10"]
    assert info["finetuned"] is False and info["decision"].startswith("kept the base embedder")
    assert same_model(tmp_path / "bundle" / "embedder", base_model)
