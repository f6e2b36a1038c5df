"""Fine-tune the sentence-transformers embedder on the knowledge base, and ship it only if it retrieves better.

1. The base embedder embeds every chunk once; those embeddings mine hard negatives (with BM25) and score the
   base model before training.
2. ``builder.embedder_pairs.make_embedder_pairs`` makes (query, positive, hard negatives) pairs; a deterministic
   share (``embedder.eval_fraction``) is held out and every pair is written to ``data/embedder_pairs.jsonl``.
3. SentenceTransformerTrainer trains with MultipleNegativesRankingLoss (the cached variant above
   ``embedder.cached_loss_above`` pairs per batch) and a no-duplicates batch sampler (or, with
   ``embedder.sources_per_batch``, batches filled from a few documents at a time), in bf16 autocast where the
   hardware multiplies bf16 natively.
4. An InformationRetrievalEvaluator over all chunks scores base and fine-tuned on the gate's questions: the
   real questions held out of training when there are enough, else the generated dev questions (chunks no
   training pair used, a prompt no training question came from), else every held-out pair. The fine-tuned
   model ships only if its MRR@10 beats the base by more than ``embedder.min_gain`` and its recall@10 and
   recall@20 are not below the base's by more than ``embedder.recall_margin``; otherwise the bundle keeps the
   base model and the manifest says why.

    assistant build knowledge --profile cpu --out bundles --set llm.finetune=false
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder import embedder_pairs
from builder.generated_questions import GENERATED_DEV, GeneratedQuestions
from core.bundle import BASE_EMBEDDINGS_FILE, DATA_DIR, EMBEDDER_DIR, PAIRS_FILE, Chunk
from core.config import BuildConfig
from core.device import autocast_dtype
from core.hashing import ids_digest, stable_fraction
from core.log import say
from core.retrieval import encode_texts
from core.text import normalize

GATE_METRIC = "mrr@10"
DEPTH_METRICS = ("recall@10", "recall@20")  # what a fine-tune may not lose for its gain at the top
# The gate scores held-out real questions when there are enough of them to mean something, else generated dev
# questions when there are enough of those; below that it scores every held-out pair.
GATE_MIN_QUESTIONS = 20


def copy_base(base: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(base, out_dir, ignore=shutil.ignore_patterns(".git*", "README.md", "*.onnx", "onnx",
                                                                 "openvino", "*.h5", "*.msgpack", "*.ot"))


def chunk_ids_digest(chunks: Sequence[Chunk]) -> str:
    """Ties cached chunk embeddings to the exact chunk list (and order) they were computed for."""
    return ids_digest(c.chunk_id for c in chunks)


# ----------------------------------------------------------------------------------------------- evaluation

def relevant_for_eval(pair: embedder_pairs.EmbedderPair, norm_texts: Sequence[str]) -> set[int]:
    """The pair's relevant chunks; for a cloze query also every chunk holding the sentence (overlaps)."""
    rel = set(pair.relevant) | {pair.positive}
    if pair.kind == "ict" and pair.answer:
        needle = normalize(pair.answer)
        rel |= {i for i, t in enumerate(norm_texts) if needle in t}
    return rel


def make_ir_evaluator(pairs: Sequence[embedder_pairs.EmbedderPair], chunks: Sequence[Chunk], name: str):
    """sentence-transformers' InformationRetrievalEvaluator over every chunk, for the given held-out pairs."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    norm_texts = [normalize(c.text) for c in chunks]
    queries = {f"q{n}": p.query for n, p in enumerate(pairs)}
    relevant = {f"q{n}": {str(i) for i in relevant_for_eval(p, norm_texts)} for n, p in enumerate(pairs)}
    corpus = {str(i): c.text for i, c in enumerate(chunks)}
    return InformationRetrievalEvaluator(queries, corpus, relevant, name=name, accuracy_at_k=[1, 5, 10, 20],
                                         precision_recall_at_k=[10], mrr_at_k=[10], ndcg_at_k=[10], map_at_k=[10],
                                         write_csv=False, batch_size=64)


def run_ir_evaluator(evaluator, model, corpus_embeddings: np.ndarray, device: str) -> dict[str, float]:
    """recall@1/5/10/20 (a relevant chunk in the top k), MRR@10 and nDCG@10, named as in
    builder.evaluate_retrieval (retrieval_metrics)."""
    import torch

    from core.device import autocast_context

    with autocast_context(device):
        raw = evaluator(model, corpus_embeddings=torch.from_numpy(corpus_embeddings).to(model.device))
    picked: dict[str, float] = {}
    for ours, theirs in (("recall@1", "accuracy@1"), ("recall@5", "accuracy@5"), ("recall@10", "accuracy@10"),
                         ("recall@20", "accuracy@20"), ("mrr@10", "mrr@10"), ("ndcg@10", "ndcg@10")):
        values = [v for k, v in raw.items() if k.endswith(f"_{theirs}")]
        picked[ours] = round(float(values[0]), 4) if values else float("nan")
    picked["queries"] = float(len(evaluator.queries))
    return picked


def promotion_decision(base: dict[str, float], finetuned: dict[str, float], min_gain: float,
                       recall_margin: float = 0.0, metric: str = GATE_METRIC,
                       on: str = "held-out pairs") -> tuple[bool, str]:
    """Ship the fine-tuned embedder only if it beats the base by more than min_gain on the gate metric and
    loses no more than recall_margin of recall at depth (DEPTH_METRICS)."""
    b, f = base.get(metric, float("nan")), finetuned.get(metric, float("nan"))
    n = int(base.get("queries", 0))
    if not (math.isfinite(b) and math.isfinite(f)):
        return False, f"kept the base embedder: {metric} could not be measured on the {on}"
    lost = [f"{m} {finetuned[m]:.4f} vs base {base[m]:.4f}" for m in DEPTH_METRICS
            if m in base and m in finetuned and finetuned[m] < base[m] - recall_margin]
    if f > b + min_gain and not lost:
        return True, (f"shipped the fine-tuned embedder: {metric} {f:.4f} vs base {b:.4f} "
                      f"(gain {f - b:+.4f} > min_gain {min_gain}), recall at depth kept within {recall_margin} "
                      f"on {n} {on}")
    if lost:
        return False, (f"kept the base embedder: the fine-tune lost recall at depth ({'; '.join(lost)}: more than "
                       f"recall_margin {recall_margin}), {metric} {f:.4f} vs {b:.4f}, on {n} {on}")
    return False, (f"kept the base embedder: fine-tuned {metric} {f:.4f} vs base {b:.4f} "
                   f"(gain {f - b:+.4f} is not above min_gain {min_gain}) on {n} {on}")


# ----------------------------------------------------------------------------------------------- training

@dataclass(frozen=True)
class RowInfo:
    """What the source-grouped batch sampler knows about a training row (it never sees the dataset's text)."""
    source: str  # the document of the row's positive
    repeat: int  # which of the question's repeats this row is (0 for a synthetic pair)
    answer: str  # normalized answer text ("" when the pair has none)


def training_rows(pairs: Sequence[embedder_pairs.EmbedderPair], chunks: Sequence[Chunk], n_negatives: int,
                  seed: int = 0, question_repeats: int = 1,
                  info: list[RowInfo] | None = None) -> dict[str, list[str]]:
    """Columns anchor, positive, negative_1..n. A question pair appears ``question_repeats`` times, each time with
    the next n of its mined negatives. Rows short of mined negatives are topped up with random chunks that do not
    answer the query, because every row needs the same number of columns. ``info``, when given, receives one
    ``RowInfo`` per row, in row order."""
    norm_texts = [normalize(c.text) for c in chunks]
    rows: list[tuple[str, str, list[str]]] = []
    width = n_negatives
    for p in pairs:
        repeats = max(1, question_repeats) if p.kind in embedder_pairs.SUPERVISED_KINDS else 1
        for r in range(repeats):
            negs = list(p.negatives[r * n_negatives:(r + 1) * n_negatives])
            if len(negs) < n_negatives:
                rng = random.Random(f"{seed}:fill:{r}:{p.query}")
                blocked = set(p.relevant) | {p.positive} | set(negs)
                needle = normalize(p.answer) if p.answer else ""
                pool = [i for i in range(len(chunks))
                        if i not in blocked and not (needle and needle in norm_texts[i])]
                rng.shuffle(pool)
                negs += pool[:n_negatives - len(negs)]
            width = min(width, len(negs))
            rows.append((p.query, p.text(chunks), [chunks[i].text for i in negs]))
            if info is not None:
                info.append(RowInfo(chunks[p.positive].source, r,
                                    normalize(p.answer) if p.answer else ""))
    columns: dict[str, list[str]] = {"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows]}
    for j in range(width):
        columns[f"negative_{j + 1}"] = [r[2][j] for r in rows]
    return columns


class SourceGroupedBatchSampler:
    """Batches whose rows come from a few documents at a time, so that in-batch negatives are other passages of
    the same document: the passages a fine-tuned embedder still confuses with the answer (topic-aware sampling,
    Hofstaetter et al., 2021, with the document as the topic).

    Each pass over the rows (a question's repeats fall in different passes) visits the documents in a seeded
    order, ``sources`` of them open at a time, and fills a batch from the open ones in turn. As in the
    no-duplicates sampler, a row is put off to a later batch when one of its texts is already in the batch, and,
    because passages of one document overlap, also when its answer appears in a text of the batch or the
    answer of a row in the batch appears in one of its texts (a false negative either way).
    """

    def __init__(self, dataset, batch_size: int, drop_last: bool = False, *, info: Sequence[RowInfo],
                 sources: int, seed: int = 0, **_ignored) -> None:
        if len(info) != len(dataset):
            raise ValueError(f"{len(info)} row records for {len(dataset)} rows")
        if sources < 1:
            raise ValueError(f"sources per batch must be at least 1, got {sources}")
        self.batch_size, self.drop_last, self.sources, self.seed = batch_size, drop_last, sources, seed
        self.info = list(info)
        columns = list(dataset.column_names)
        self.texts = [tuple(row) for row in zip(*(dataset[c] for c in columns))]
        # Answers are looked for in the passages (anchors are queries): normalized like the answers.
        self.norm = [tuple(normalize(t) for t in row[1:]) for row in self.texts]
        self.epoch = 0
        self._planned: tuple[int, list[list[int]]] | None = None  # the last epoch planned, and its batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._plan(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._plan(self.epoch))

    def _conflicts(self, i: int, batch: list[int], seen: set[str]) -> bool:
        if any(t in seen for t in self.texts[i]):
            return True
        answer = self.info[i].answer
        for j in batch:
            if answer and any(answer in t for t in self.norm[j]):
                return True
            other = self.info[j].answer
            if other and any(other in t for t in self.norm[i]):
                return True
        return False

    def _offer(self, i: int, batch: list[int], seen: set[str], later: list[int]) -> None:
        """Row i joins the batch if there is room and nothing clashes; otherwise it waits for a later batch."""
        if len(batch) < self.batch_size and not self._conflicts(i, batch, seen):
            batch.append(i)
            seen.update(self.texts[i])
        else:
            later.append(i)

    def _plan(self, epoch: int) -> list[list[int]]:
        if self._planned and self._planned[0] == epoch:
            return self._planned[1]
        rng = random.Random(f"{self.seed}:source-batches:{epoch}")
        groups: list[list[int]] = []
        for rep in sorted({r.repeat for r in self.info}):
            by_source: dict[str, list[int]] = {}
            for i, r in enumerate(self.info):
                if r.repeat == rep:
                    by_source.setdefault(r.source, []).append(i)
            names = sorted(by_source)
            rng.shuffle(names)
            for name in names:
                rows = by_source[name]
                rng.shuffle(rows)
                groups.append(rows)
        groups.reverse()  # popped from the end, so visited in the order drawn
        opened: list[list[int]] = []
        carried: list[int] = []
        batches: list[list[int]] = []
        while groups or opened or carried:
            batch: list[int] = []
            seen: set[str] = set()
            later: list[int] = []
            for i in carried:
                self._offer(i, batch, seen, later)
            while len(batch) < self.batch_size:
                while len(opened) < self.sources and groups:
                    opened.append(groups.pop())
                if not opened:
                    break
                for rows in opened:
                    if len(batch) >= self.batch_size:
                        break
                    self._offer(rows.pop(), batch, seen, later)
                opened = [rows for rows in opened if rows]
            carried = later
            if batch:
                batches.append(batch)
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        self._planned = (epoch, batches)
        return batches


def train(model, pairs: Sequence[embedder_pairs.EmbedderPair], chunks: Sequence[Chunk], cfg: BuildConfig, device: str,
          work_dir: Path, epochs: float | None = None, learning_rate: float | None = None,
          question_repeats: int | None = None) -> dict:
    """Fine-tune ``model`` in place on the pairs; returns the resolved settings and the loss curve's ends.
    ``epochs``, ``learning_rate`` and ``question_repeats`` default to the embedder config's."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    ecfg = cfg.embedder
    epochs = ecfg.epochs if epochs is None else epochs
    learning_rate = ecfg.learning_rate if learning_rate is None else learning_rate
    question_repeats = ecfg.question_repeats if question_repeats is None else question_repeats
    info: list[RowInfo] = []
    columns = training_rows(pairs, chunks, cfg.datagen.hard_negatives, cfg.seed, question_repeats, info)
    dataset = Dataset.from_dict(columns)
    if ecfg.sources_per_batch:
        sampler = functools.partial(SourceGroupedBatchSampler, info=info, sources=ecfg.sources_per_batch,
                                    seed=cfg.seed)
        sampler_name = f"source_grouped ({ecfg.sources_per_batch} documents at a time)"
    else:
        sampler, sampler_name = BatchSamplers.NO_DUPLICATES, "no_duplicates"
    batch_size = max(2, min(ecfg.batch_size, len(dataset)))
    if batch_size > ecfg.cached_loss_above:
        loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=min(32, ecfg.cached_loss_above))
    else:
        loss = MultipleNegativesRankingLoss(model)
    steps = math.ceil(len(dataset) / batch_size) * epochs
    dtype = autocast_dtype(device)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=ecfg.warmup_ratio,  # a float below 1 is a share of the steps
        lr_scheduler_type="linear",
        batch_sampler=sampler,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        use_cpu=device == "cpu",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=max(1, int(steps) // 10),
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    start = time.perf_counter()
    trainer.train()
    seconds = round(time.perf_counter() - start, 1)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model.eval()
    return {
        "loss": type(loss).__name__,
        "batch_sampler": sampler_name,
        "batch_size": batch_size,
        "epochs": epochs,
        "steps": int(trainer.state.global_step),
        "learning_rate": learning_rate,
        "warmup_ratio": ecfg.warmup_ratio,
        "scheduler": "linear",
        "hard_negatives_per_pair": len(columns) - 2,
        "max_seq_length": int(model.max_seq_length),
        "precision": f"{str(dtype).replace('torch.', '')} autocast" if dtype is not None else "float32",
        "device": device,
        "seed": cfg.seed,
        "question_repeats": question_repeats,
        "train_pairs": len(pairs),
        "train_rows": len(dataset),
        "loss_first": round(losses[0], 4) if losses else None,
        "loss_last": round(losses[-1], 4) if losses else None,
        "train_seconds": seconds,
    }


def remine_round(model, pairs: Sequence[embedder_pairs.EmbedderPair], chunks: Sequence[Chunk], ft_emb: np.ndarray,
                 cfg: BuildConfig, device: str) -> tuple[dict, np.ndarray]:
    """One more pass over the real questions, each with fresh hard negatives mined by the model just trained
    (its chunk embeddings ``ft_emb``, fused with BM25 as in the first mining). The first round's negatives were
    hard for the base model; these are the passages the fine-tuned one still confuses with the answer (on
    COVID-QA its misses are mostly other passages of the right article). Trains ``model`` in place at
    ``embedder.remine_lr_scale`` times the learning rate; returns the round's record and the chunks' new
    embeddings."""
    import dataclasses

    questions = [dataclasses.replace(p, negatives=[]) for p in pairs if p.kind in embedder_pairs.SUPERVISED_KINDS]
    start = time.perf_counter()
    ranker = embedder_pairs.BaseRanker(chunks, lambda qs: encode_texts(model, qs, autocast_device=device), ft_emb,
                                cfg.retrieval.bm25_analyzer())
    dropped = embedder_pairs.mine_hard_negatives(questions, chunks, ranker, cfg.datagen.hard_negatives)
    mine_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="embedder-remine-") as work:
        info = train(model, questions, chunks, cfg, device, Path(work), epochs=1.0, question_repeats=1,
                     learning_rate=cfg.embedder.learning_rate * cfg.embedder.remine_lr_scale)
    say(f"    embedding {len(chunks)} chunks with the re-trained embedder")
    emb = encode_texts(model, [c.text for c in chunks], autocast_device=device, progress=True)
    return ({"pairs": len(questions), "false_negatives_dropped": dropped, "mine_seconds": round(mine_s, 1),
             "steps": info["steps"], "learning_rate": info["learning_rate"], "train_seconds": info["train_seconds"],
             "loss_first": info["loss_first"], "loss_last": info["loss_last"]}, emb)


# ----------------------------------------------------------------------------------------------- the stage

def base_ranker(cfg: BuildConfig, base: Path, chunks: Sequence[Chunk], device: str = "cpu") -> embedder_pairs.BaseRanker:
    """The base embedder's chunk embeddings fused with BM25: the round trip of the generated questions and the
    miner of hard negatives both rank with it (its ``emb`` are the base chunk embeddings, computed once)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(base), device=device)
    say(f"    embedding {len(chunks)} chunks with the base embedder")
    emb = encode_texts(model, [c.text for c in chunks], autocast_device=device, progress=True)
    return embedder_pairs.BaseRanker(chunks, lambda qs: encode_texts(model, qs, autocast_device=device), emb,
                                     cfg.retrieval.bm25_analyzer())


def run(cfg: BuildConfig, base: Path, chunks: list[Chunk], train_questions: list[dict], bundle_dir: Path,
        device: str = "cpu", ranker: embedder_pairs.BaseRanker | None = None,
        generated: GeneratedQuestions | None = None) -> dict:
    """Write the (unfinished) bundle's embedder/ folder and its pairs in data/; return the manifest entry
    (decision, metrics, settings). ``ranker``: ``base_ranker``'s, when the caller has it already;
    ``generated``: the build's generated questions (training ones are trained on, dev ones can gate).

    The entry's ``chunk_embeddings`` (the shipped model's embeddings of the chunks, in chunk order) is for the
    index stage to reuse and must be popped before the entry is written.
    """
    from sentence_transformers import SentenceTransformer

    base = Path(base)
    out_dir, data_dir = Path(bundle_dir) / EMBEDDER_DIR, Path(bundle_dir) / DATA_DIR
    if not cfg.embedder.finetune:
        copy_base(base, out_dir)
        return {"path": EMBEDDER_DIR, "finetuned": False, "decision": "fine-tuning disabled (embedder.finetune=false)"}
    data_dir.mkdir(parents=True, exist_ok=True)
    texts = [c.text for c in chunks]
    model = SentenceTransformer(str(base), device=device)
    longest = max((c.n_tokens for c in chunks), default=0)
    if longest > model.max_seq_length:
        say(f"    warning: the longest chunk has {longest} tokens, over the embedder's {model.max_seq_length}")
    ranker = ranker or base_ranker(cfg, base, chunks, device)
    base_emb = ranker.emb
    generated = generated or GeneratedQuestions()

    pairs, stats = embedder_pairs.make_embedder_pairs(cfg, chunks, train_questions, ranker, generated.train,
                                                      exclude=generated.dev_chunks)
    train_pairs, held = embedder_pairs.split_pairs(pairs, cfg.embedder.eval_fraction, cfg.seed)
    embedder_pairs.write_pairs(Path(bundle_dir) / PAIRS_FILE, train_pairs, held, chunks)
    say(f"    {len(pairs)} pairs ({', '.join(f'{stats[k]} {k}' for k in embedder_pairs.KINDS if stats[k])}); "
        f"{len(train_pairs)} train, {len(held)} held out; {stats['unmatched_questions']} questions matched no chunk")
    info: dict = {"path": EMBEDDER_DIR, "finetuned": False, "pairs_file": PAIRS_FILE, "data": stats}
    if len(train_pairs) < 2 or not held:
        copy_base(base, out_dir)
        info["decision"] = (f"kept the base embedder: too few pairs to train and check ({len(train_pairs)} train, "
                            f"{len(held)} held out)")
        info["chunk_embeddings"] = base_emb
        return info

    held_questions = [p for p in held if p.kind == "question"]
    dev_pairs, _ = embedder_pairs.question_pairs(generated.dev, chunks, kind="generated")
    if len(held_questions) >= GATE_MIN_QUESTIONS:
        gate_key, gate_on = "questions", "held-out questions"
    elif len(dev_pairs) >= GATE_MIN_QUESTIONS:
        gate_key, gate_on = "generated_dev", GENERATED_DEV
    else:
        gate_key, gate_on = "all", "held-out pairs"
    evaluators = {"all": make_ir_evaluator(held, chunks, "heldout-all")}
    if held_questions:
        evaluators["questions"] = make_ir_evaluator(held_questions, chunks, "heldout-questions")
    if dev_pairs:
        evaluators["generated_dev"] = make_ir_evaluator(dev_pairs, chunks, "generated-dev")
    before = {k: run_ir_evaluator(e, model, base_emb, device) for k, e in evaluators.items()}
    say(f"    base embedder on {gate_on}: " + _fmt(before[gate_key]))

    with tempfile.TemporaryDirectory(prefix="embedder-train-") as work:
        training = train(model, train_pairs, chunks, cfg, device, Path(work))
    say(f"    embedding {len(texts)} chunks with the fine-tuned embedder")
    ft_emb = encode_texts(model, texts, autocast_device=device, progress=True)
    after = {k: run_ir_evaluator(e, model, ft_emb, device) for k, e in evaluators.items()}
    say(f"    fine-tuned embedder on {gate_on}: " + _fmt(after[gate_key]))
    rounds = []
    # A round trains the real questions only; a folder without any has nothing to re-mine for.
    wanted = cfg.embedder.remine_rounds if any(p.kind in embedder_pairs.SUPERVISED_KINDS for p in train_pairs) else 0
    for n in range(1, wanted + 1):
        kept = {k: v.detach().clone() for k, v in model.state_dict().items()}
        round_info, round_emb = remine_round(model, train_pairs, chunks, ft_emb, cfg, device)
        round_after = {k: run_ir_evaluator(e, model, round_emb, device) for k, e in evaluators.items()}
        better = round_after[gate_key][GATE_METRIC] > after[gate_key][GATE_METRIC]
        round_info.update({"round": n, "heldout": round_after[gate_key], "kept": better})
        rounds.append(round_info)
        say(f"    after re-mined round {n} on {gate_on}: " + _fmt(round_after[gate_key])
            + ("" if better else f" (not better than before it: {GATE_METRIC} "
                                 f"{after[gate_key][GATE_METRIC]:.4f}; round undone)"))
        if not better:
            model.load_state_dict(kept)
            break
        after, ft_emb = round_after, round_emb
    if rounds:
        training["remine"] = rounds

    # The same evaluation on (at most 200 of) its training pairs: the gap to the held-out pairs is the overfitting.
    train_sample = sorted(train_pairs, key=lambda p: stable_fraction(f"fit:{p.query}", cfg.seed))[:200]
    info["train_fit"] = run_ir_evaluator(make_ir_evaluator(train_sample, chunks, "train-fit"), model, ft_emb, device)
    ship, decision = promotion_decision(before[gate_key], after[gate_key], cfg.embedder.min_gain,
                                        cfg.embedder.recall_margin, on=gate_on)
    say(f"    {decision}")
    if ship:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        model.save(str(out_dir))
        np.save(Path(bundle_dir) / BASE_EMBEDDINGS_FILE, base_emb)
        info["base_chunk_embeddings"] = {"path": BASE_EMBEDDINGS_FILE, "chunks": len(chunks),
                                         "chunk_ids": chunk_ids_digest(chunks)}
    else:
        copy_base(base, out_dir)
    info.update({
        "finetuned": ship,
        "decision": decision,
        "gate": {"metric": GATE_METRIC, "on": gate_on, "min_gain": cfg.embedder.min_gain,
                 "depth": list(DEPTH_METRICS), "recall_margin": cfg.embedder.recall_margin,
                 "base": before[gate_key], "finetuned": after[gate_key]},
        "heldout": {k: {"base": before[k], "finetuned": after[k]} for k in evaluators},
        "training": training,
        "chunk_embeddings": ft_emb if ship else base_emb,
    })
    return info


def heldout_questions(bundle_dir: Path) -> list[dict]:
    """The real questions the embedder held out (never trained on), as question dicts, from the pairs file."""
    path = Path(bundle_dir) / PAIRS_FILE
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row.get("split") == "eval" and row.get("kind") == "question" and row.get("answer"):
                out.append({"question": row["query"], "answer": row["answer"], "source": row.get("source")})
    return out


def _fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k != "queries") + f" ({int(m['queries'])} queries)"
