"""LoRA supervised fine-tuning of the base LLM on retrieval-augmented chat examples (PEFT), with a promotion gate.

The stage, in order:

1. chat examples (``builder.chat_examples``) with contexts from the bundle's own retriever, cut as serving cuts
   them, written to ``data/chat_train.jsonl``;
2. LoRA training (``builder.lora_trainer``), in-process, or under ``accelerate launch`` when
   ``llm.accelerate_config`` names a config; checkpoints live in ``OUT/.checkpoints/<key>`` (next to the
   bundles, outside the bundle's temporary folder, which a failed build deletes), keyed by the base model, the
   chat data and the settings, so running the same build again after a kill resumes from the last checkpoint;
3. the adapter (with the tokenizer) in ``llm/adapter`` (the layout ``vllm --enable-lora`` loads), the loss
   curve in ``eval/loss.png``, and merged weights in ``llm/merged`` when ``llm.merge`` is set or serving will
   want them (``serve.use_merged`` yes, or auto without CUDA);
4. the gate: base and fine-tuned answers on the held-out questions (``builder.evaluate_answers``); the adapter
   ships only if its F1 beats the base model's by more than ``llm.min_gain`` and the interval of the gain rules
   out a loss larger than ``llm.harm_margin``. Without held-out questions, a
   slice of the training questions is held back from training for the gate; without real questions, the
   generated dev questions decide (their answer is the sentence they were written from); without any, the
   adapter ships and the decision says that nothing measured it.

    assistant build knowledge --profile cpu --set llm.max_steps=60
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from builder import chat_examples, lora_trainer
from builder.evaluate_answers import SYSTEMS, answers_cache_key, evaluate_answers, select_questions
from builder.generated_questions import GENERATED_DEV, GeneratedQuestions
from builder.questions import split_questions
from core.abstention import AbstentionRule
from core.bundle import (
    ADAPTER_DIR,
    ANSWERS_FILE,
    CHAT_FILE,
    EMBEDDER_DIR,
    INDEX_DIR,
    LOSS_PLOT,
    MERGED_DIR,
    MERGED_W8A8_DIR,
    Chunk,
    ServedRetrieval,
)
from core.config import BuildConfig, dumps
from core.device import cuda_available
from core.focus import focus_for
from core.hashing import file_sha256, folder_sha256
from core.hf_engine import load_tokenizer, merge_adapter
from core.log import say, step
from core.retrieval import Retriever

ACCELERATE_DIR = Path(__file__).resolve().parent / "accelerate"
# When nothing is held out, this share of the training questions (at least GATE_MIN, at most GATE_MAX: the gate
# needs a clear signal, not a benchmark) is held back from training to decide whether the adapter ships.
GATE_SLICE, GATE_MIN, GATE_MAX = 0.1, 10, 60
# Training questions answered beside the test split, for the report card's train-vs-test gap: enough to see a
# gap of ten points, few enough to cost seconds.
TRAIN_FIT_QUESTIONS = 40


def run(cfg: BuildConfig, base: Path | str, chunks: list[Chunk], train_questions: list[dict],
        dev: list[dict], test: list[dict], bundle_dir: Path, device: str = "cpu",
        retrieval_mode: str | None = None, abstention: AbstentionRule | None = None,
        generated: GeneratedQuestions | None = None) -> dict:
    """Write llm/adapter/ (and llm/merged/) when an adapter ships; return the manifest entry. The gate decides on
    ``dev`` (or a slice held back from training), comparing the two models on every question; ``test`` is
    scored once, after the decision, and reported as served: with the ``abstention`` rule applied."""
    if not cfg.llm.finetune:
        return {"adapter": None, "merged": None, "decision": "fine-tuning disabled (llm.finetune=false)"}
    bundle_dir = Path(bundle_dir)
    base = str(base)
    retriever = load_retriever(bundle_dir, cfg, retrieval_mode)
    generated = generated or GeneratedQuestions()
    gate_questions, train_questions, gate_from = split_gate(dev, train_questions, cfg.seed, generated.dev)

    requested = cfg.llm.max_steps
    # The steps this folder trains for; the caller's config is left as it was asked for. Generated questions
    # are supervision too: a plain folder trains on as many distinct examples as a FAQ of that size would.
    supervised = len(train_questions) + len(generated.train)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, max_steps=training_steps(cfg.llm, supervised)))
    if cfg.llm.max_steps != requested:
        say(f"    {cfg.llm.max_steps} LoRA steps for {supervised} training questions ({len(train_questions)} given, "
            f"{len(generated.train)} generated; llm.steps_per_question {cfg.llm.steps_per_question:g}, "
            f"cap {cfg.llm.steps_cap or 'none'})")
    tok = load_tokenizer(base)

    def count(messages: list[dict]) -> int:
        return len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])

    # The passages cut as serving will cut them, for training and for both evaluations.
    focus = focus_for(retriever, base, *passage_budgets(cfg))
    with step("chat examples"):
        rows = chat_examples.build_chat_data(cfg, chunks, train_questions, retriever, bundle_dir / CHAT_FILE,
                                             count=count, generated=generated.train,
                                             exclude=generated.dev_chunks, focus=focus)
        data_info = chat_examples.summarize(rows)
        say(f"    {data_info['examples']} examples {data_info['by_origin']}, "
            f"{data_info['gold_absent']} without the answer")
    if not rows:
        return {"adapter": None, "merged": None, "data": data_info,
                "decision": "no chat examples could be made (no question is answered by any chunk)"}

    work = checkpoint_dir(bundle_dir.parent, cfg, base, bundle_dir / CHAT_FILE)
    with step(f"LoRA training ({cfg.llm.max_steps} steps; checkpoints in {work})"):
        result = train(cfg, base, bundle_dir / CHAT_FILE, work, device)
    adapter_dir = bundle_dir / ADAPTER_DIR
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    shutil.copytree(work / lora_trainer.FINAL, adapter_dir)
    plot_loss(result.get("loss_curve", []), bundle_dir / LOSS_PLOT,
              title=f"LoRA r={cfg.llm.lora_r}, {result['steps']} steps, {result['examples']} examples")
    training = {k: v for k, v in result.items() if k != "loss_curve"}

    merged_dir = None
    cuda = cuda_available()
    if wants_merged(cfg, cuda):
        with step(f"merging the adapter into full weights ({MERGED_DIR})"):
            merged_dir = merge_adapter(base, str(adapter_dir), bundle_dir / MERGED_DIR)
    int8_dir = None
    if merged_dir and cfg.serve.writes_int8(cuda):
        from builder.quantize import quantize_checkpoint  # imports torch at module level

        with step(f"int8 weights for serving on the CPU ({MERGED_W8A8_DIR})"):
            int8_dir = quantize_checkpoint(merged_dir, bundle_dir / MERGED_W8A8_DIR)

    def answers(questions: list[dict], systems, label: str, rule: AbstentionRule | None = None,
                fit: list[dict] | None = None) -> dict:
        with step(f"answer evaluation on {len(questions)} questions ({label})"):
            return evaluate_answers(retriever, questions, cfg.retrieval.top_k, base, cfg, adapter=str(adapter_dir),
                                    merged=str(merged_dir) if merged_dir else None,
                                    merged_w8a8=str(int8_dir) if int8_dir else None, systems=systems, log=say,
                                    focus=focus, abstention=rule, fit_questions=fit or ())

    report: dict = {}
    if gate_questions:
        report = answers(select_questions(gate_questions, cfg.eval.max_answer_questions), ("base", "finetuned"),
                         gate_from)
    ship, decision = gate(report, cfg.llm.min_gain, cfg.llm.harm_margin, gate_from)
    say(f"    {decision}")
    tested: dict = {}
    if test:
        # Scored once, after the decision: both models, so the report shows what the gate kept and what it did not.
        picked = select_questions(test, cfg.eval.max_answer_questions)
        fit = select_questions(train_questions, TRAIN_FIT_QUESTIONS)
        tested = answers(picked, SYSTEMS, "test split", abstention, fit)
        # `assistant eval` on the same questions reads this instead of generating again.
        cached = {k: v for k, v in tested.items() if ship or k not in ("finetuned", "finetuned_vs_base")}
        key = answers_cache_key(picked, cfg, cfg.retrieval.top_k, ship, passage_budgets(cfg), abstention)
        (bundle_dir / ANSWERS_FILE).write_text(json.dumps({"key": key, "report": cached}, indent=2) + "\n")
    if not ship:
        shutil.rmtree(adapter_dir, ignore_errors=True)
        for d in (merged_dir, int8_dir):
            if d:
                shutil.rmtree(d, ignore_errors=True)
        merged_dir = int8_dir = None
    shutil.rmtree(work, ignore_errors=True)  # the adapter is in the bundle now
    return {"adapter": ADAPTER_DIR if ship else None,
            "merged": MERGED_DIR if ship and merged_dir else None,
            "merged_w8a8": MERGED_W8A8_DIR if ship and int8_dir else None,
            "max_steps": cfg.llm.max_steps, "decision": decision, "gate_from": gate_from,
            "metrics": _reported(tested, "test split"), "dev_metrics": _reported(report, gate_from),
            "training": training, "data": data_info,
            "examples": (tested or report).get("examples", [])[:5]}


def _reported(report: dict, split: str) -> dict:
    """The systems and comparisons of an answer report, labelled with the split they were scored on."""
    keep = (*SYSTEMS, "finetuned_vs_base", "always_first", "top_passage", "train_fit")
    out = {k: report[k] for k in keep if k in report}
    return {**out, "split": split} if out else {}


def split_gate(dev: list[dict], train_questions: list[dict], seed: int,
               generated_dev: list[dict] = ()) -> tuple[list[dict], list[dict], str]:
    """(gate questions, training questions, where the gate questions came from): the dev split, else a slice of
    the training questions held back, else the generated dev questions (builder.generated_questions).

    A dev split smaller than GATE_MAX is topped up with generated dev questions: 31 questions left a real gain
    of +0.06 F1 inside an interval crossing zero (knowledge/, history file), and the generated ones are as
    unseen by the adapter (other chunks, another prompt)."""
    if dev:
        extra = list(generated_dev)[:max(0, GATE_MAX - len(dev))]
        if not extra:
            return dev, train_questions, "dev split"
        where = f"questions: {len(dev)} of the dev split and {len(extra)} {GENERATED_DEV}"
        return dev + extra, train_questions, where
    if len(train_questions) >= GATE_MIN * 3:
        train, gate_q = split_questions(train_questions, GATE_SLICE, seed + 101)
        if len(gate_q) >= GATE_MIN:
            train += gate_q[GATE_MAX:]  # beyond the cap they are worth more as training data
            return gate_q[:GATE_MAX], train, "training questions held back from LoRA training"
    if len(generated_dev) >= GATE_MIN:
        return list(generated_dev)[:GATE_MAX], train_questions, GENERATED_DEV
    return [], train_questions, "none"


def gate(report: dict, min_gain: float, harm_margin: float, gate_from: str) -> tuple[bool, str]:
    """(ship?, decision in words): the adapter ships when its F1 gain over the base, on the gate's questions, is
    above ``min_gain`` and the paired bootstrap interval (95%) of that gain rules out a loss larger than
    ``harm_margin``. The gate is there to see harm, as the embedder's is (a gain, with depth kept within a
    margin): on 40-60 questions an interval wholly above zero asks more than a real gain of +0.06 F1 can show
    (make run at e3e20c6: [-0.011, +0.137], the base served; BENCHMARKS.md's history)."""
    if not report or "finetuned" not in report or "base" not in report:
        return True, ("shipped without a gate: there are no dev questions (the knowledge folder has no "
                      "question/answer pairs to hold out, too few were given with --questions and too few "
                      "generated ones passed the round trip), so nothing measured the adapter")
    b, f = report["base"]["f1"], report["finetuned"]["f1"]
    paired = report.get("finetuned_vs_base") or {}
    low, high = paired.get("ci", [f - b, f - b])
    where = f"{int(report['base']['questions'])} {gate_from}"
    said = (f"fine-tuned F1 {f:.3f} vs base {b:.3f} on {where}: gain {f - b:+.3f}, 95% paired bootstrap "
            f"interval [{low:+.3f}, {high:+.3f}]")
    if f - b <= min_gain:
        return False, (f"rejected: {said}; the gain is not above llm.min_gain {min_gain}; the bundle serves the "
                       "base model")
    if low <= -harm_margin:
        return False, (f"rejected: {said}; the interval leaves a loss of more than llm.harm_margin {harm_margin} "
                       "possible (a higher mean not shown to be safe on these questions); the bundle serves the "
                       "base model")
    return True, (f"shipped: {said}: above llm.min_gain {min_gain}, and no loss of more than llm.harm_margin "
                  f"{harm_margin}")


def wants_merged(cfg: BuildConfig, cuda: bool) -> bool:
    """Write merged weights: asked for (llm.merge), or what serving on this machine will want."""
    return bool(cfg.llm.merge) or cfg.serve.writes_merged(cuda)


def passage_budgets(cfg: BuildConfig) -> tuple[int, int]:
    """(first passage, later passages) token budgets of the LLM's passages, as the manifest records them."""
    return cfg.retrieval.first_passage_tokens, cfg.retrieval.passage_tokens


def training_steps(llm, supervised_questions: int) -> int:
    """LoRA steps: ``max_steps``, raised to ``steps_per_question`` per training question, at most ``steps_cap``
    (which never cuts below ``max_steps``)."""
    want = math.ceil(llm.steps_per_question * supervised_questions) if llm.steps_per_question > 0 else 0
    if llm.steps_cap:
        want = min(want, llm.steps_cap)
    return max(int(llm.max_steps), want)


def load_retriever(bundle_dir: Path, cfg: BuildConfig, mode: str | None = None) -> Retriever:
    """The unfinished bundle's own retriever (its embedder and index), ranking as serving will."""
    return Retriever.from_index(Path(bundle_dir) / INDEX_DIR, Path(bundle_dir) / EMBEDDER_DIR,
                                ServedRetrieval.from_config(cfg.retrieval, mode))


def checkpoint_dir(out_dir: Path, cfg: BuildConfig, base: str, data: Path) -> Path:
    """OUT/.checkpoints/<key>: the key hashes the base model's files, the chat data and the training settings,
    so only the same run resumes from it."""
    h = hashlib.sha256()
    h.update(folder_sha256(Path(base)).encode() if Path(base).is_dir() else base.encode())
    h.update(file_sha256(data).encode())
    llm = cfg.to_dict()["llm"]
    for k in ("max_new_tokens", "min_gain", "harm_margin", "merge", "finetune"):  # no effect on training
        llm.pop(k, None)
    h.update(json.dumps({"llm": llm, "seed": cfg.seed}, sort_keys=True).encode())
    return Path(out_dir) / ".checkpoints" / h.hexdigest()[:16]


def accelerate_config_path(name: str) -> Path:
    """A config shipped in builder/accelerate/ by name (ddp, fsdp, deepspeed_zero2), or a path."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    shipped = ACCELERATE_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(x.stem for x in ACCELERATE_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"llm.accelerate_config={name!r}: no such file, and not one of: {known}")


def train(cfg: BuildConfig, base: str, data: Path, work: Path, device: str) -> dict:
    """In-process training, or ``accelerate launch -m builder.lora_trainer`` when llm.accelerate_config is set."""
    name = getattr(cfg.llm, "accelerate_config", "")
    if not name:
        return lora_trainer.train(cfg, base, data, work, device=device)
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(dumps(cfg))

    config_path = accelerate_config_path(name)
    launch = yaml.safe_load(config_path.read_text()) or {}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path)]
    if launch.get("distributed_type") == "DEEPSPEED":
        # DeepSpeed checks its accumulation against the Trainer's, which train_llm derives the same way.
        micro = max(1, min(cfg.llm.micro_batch_size, cfg.llm.batch_size))
        world = int(launch.get("num_processes", 1))
        cmd += ["--gradient_accumulation_steps", str(max(1, math.ceil(cfg.llm.batch_size / (micro * world))))]
    cmd += ["-m", "builder.lora_trainer", "--data", str(data), "--base", base, "--work", str(work),
            "--config", str(work / "config.json")]
    say("    " + " ".join(cmd))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    subprocess.run(cmd, check=True, env=env)
    if not (work / lora_trainer.FINAL / "adapter_config.json").is_file():
        raise RuntimeError(f"accelerate launch finished without an adapter in {work / lora_trainer.FINAL}")
    return json.loads((work / lora_trainer.RESULT).read_text())


def plot_loss(curve: list, out: Path, title: str = "LoRA training loss") -> Path | None:
    """The training loss per step (and a moving average) as a PNG."""
    if not curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c[0] for c in curve]
    loss = [c[1] for c in curve]
    w = max(1, len(loss) // 10)
    smooth = [sum(loss[max(0, i - w + 1):i + 1]) / len(loss[max(0, i - w + 1):i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, loss, color="#9bb7d4", linewidth=1, label="loss (assistant tokens)")
    if w > 1:
        ax.plot(steps, smooth, color="#1f4e79", linewidth=2, label=f"moving average ({w} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
