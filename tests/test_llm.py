"""LoRA fine-tuning of the LLM (tiny random Llama): what is trained, on which tokens, where it is saved, how it
resumes, how it runs on several processes, and the promotion gate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder import chat_examples, llm
from builder.lora_trainer import (
    FINAL,
    RESULT,
    Collator,
    encode_example,
    last_checkpoint,
    make_trainer,
    masked_lm_loss,
    train,
)
from core.config import ConfigError, load_config
from core.hf_engine import load_tokenizer
from core.prompting import build_messages

REPO = Path(__file__).resolve().parent.parent
TEXTS = [f"Section {i}. The cooperative pays {i * 3} shillings per kilo of grade {i} coffee cherry in season {i}. "
         f"Members deliver cherry to the factory before noon." for i in range(40)]


def _examples(n: int = 24) -> list[dict]:
    rows = []
    for i in range(n):
        passages = [{"text": TEXTS[(i + k) % len(TEXTS)], "source": f"doc{(i + k) % 7}.md"} for k in range(3)]
        answer = f"The cooperative pays {i * 3} shillings per kilo. [1]"
        rows.append({"messages": build_messages(f"What is paid for grade {i} cherry?", passages)
                     + [{"role": "assistant", "content": answer}]})
    return rows


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> dict:
    """A random 2-layer Llama and a chat data file (seconds)."""
    from core.models import build_tiny_llama

    root = tmp_path_factory.mktemp("tiny-llm")
    base = build_tiny_llama(TEXTS + [m["content"] for r in _examples() for m in r["messages"]], root / "base",
                            seed=0, vocab_size=600)
    data = chat_examples.write_examples(_examples(), root / "chat_train.jsonl")
    return {"base": base, "data": data, "root": root}


def _cfg(*overrides: str):
    return load_config("tiny", None, ["llm.max_seq_len=512", "llm.checkpoint_every=2", *overrides])


def test_only_the_answer_and_its_end_of_turn_token_are_labelled(tiny_llm):
    tok = load_tokenizer(tiny_llm["base"])
    messages = _examples(1)[0]["messages"]
    enc = encode_example(tok, messages, 2048)
    labelled = [t for t in enc["labels"] if t != -100]
    n_prompt = enc["labels"].index(labelled[0])
    assert all(t == -100 for t in enc["labels"][:n_prompt]) and all(t != -100 for t in enc["labels"][n_prompt:])
    assert tok.decode(labelled).strip() == messages[-1]["content"] + tok.eos_token
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(enc["input_ids"][:n_prompt]) == prompt
    assert encode_example(tok, messages, n_prompt) is None  # too long for max_seq_len: dropped, not cut


def test_loss_covers_the_assistant_tokens_only_and_matches_the_full_computation(tiny_llm):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_llm["base"])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llm["base"]))
    batch = Collator(tok.pad_token_id)([encode_example(tok, r["messages"], 2048) for r in _examples(3)])
    labels = batch.pop("labels")
    keep = batch["logits_to_keep"]
    assert keep < labels.shape[1]  # the prompt's positions are not projected onto the vocabulary at all
    with torch.no_grad():
        ours = masked_lm_loss(model(**batch), labels)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(ours, reference, atol=1e-5)
    answer_only = labels.clone()
    answer_only[:, :] = -100
    first = (labels != -100).int().argmax(dim=1)
    for row, start in enumerate(first.tolist()):
        answer_only[row, start:start + 1] = labels[row, start:start + 1]
    with torch.no_grad():
        one_token = masked_lm_loss(model(**batch), answer_only)
    assert not torch.allclose(one_token, ours)  # the loss depends on which tokens are labelled


def test_training_changes_the_lora_parameters_and_nothing_else(tiny_llm, tmp_path):
    import torch

    cfg = _cfg("llm.max_steps=3", "llm.learning_rate=0.01")
    trainer = make_trainer(cfg, tiny_llm["base"], tiny_llm["data"], tmp_path, device="cpu", progress=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)


@pytest.fixture(scope="module")
def trained(tiny_llm) -> Path:
    """An adapter trained hard enough (high learning rate) that its effect is plain."""
    work = tiny_llm["root"] / "run"
    train(_cfg("llm.max_steps=6", "llm.learning_rate=0.05"), tiny_llm["base"], tiny_llm["data"], work,
          device="cpu", progress=False)
    return work


def test_saved_adapter_has_the_layout_vllm_loads_and_a_summary(trained):
    files = {p.name for p in (trained / FINAL).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    cfg = json.loads((trained / FINAL / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and set(cfg["target_modules"]) == set(load_config("tiny").llm.target_modules)
    result = json.loads((trained / RESULT).read_text())
    assert result["steps"] == 6 and result["tokens_per_s"] > 0 and result["final_loss"] > 0
    assert len(result["loss_curve"]) == 6


def test_adapter_loads_into_transformers_and_changes_the_output(tiny_llm, trained):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(trained / FINAL)
    prompt = tok.apply_chat_template(_examples(1)[0]["messages"][:-1], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llm["base"]))
    with torch.no_grad():
        before = base(**ids).logits[0, -1]
        tuned = PeftModel.from_pretrained(base, str(trained / FINAL))
        after = tuned(**ids).logits[0, -1]
    assert not torch.allclose(before, after, atol=1e-3)


def test_a_finished_run_is_not_trained_again(tiny_llm, trained):
    first = json.loads((trained / RESULT).read_text())
    again = train(_cfg("llm.max_steps=6", "llm.learning_rate=0.05"), tiny_llm["base"], tiny_llm["data"], trained)
    assert again == first


def _train_cmd(tiny_llm, work: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "builder.lora_trainer", "--data", str(tiny_llm["data"]), "--base",
            str(tiny_llm["base"]), "--work", str(work), "--profile", "tiny", "--no-progress",
            "--set", "llm.max_seq_len=512", *[a for o in overrides for a in ("--set", o)]]


@pytest.mark.integration
def test_a_killed_training_run_resumes_from_its_last_checkpoint(tiny_llm, tmp_path):
    work = tmp_path / "run"
    settings = ("llm.max_steps=8", "llm.checkpoint_every=2")
    slowed = [sys.executable, "-m", "tests.slow_lora_trainer", "0.5", *_train_cmd(tiny_llm, work, *settings)[3:]]
    proc = subprocess.Popen(slowed, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while last_checkpoint(work) is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert last_checkpoint(work) is not None, proc.stderr.read().decode()[-2000:] if proc.poll() else "timeout"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = int(last_checkpoint(work).name.split("-")[-1])
    assert 2 <= killed_at < 8 and not (work / RESULT).exists()

    done = subprocess.run(_train_cmd(tiny_llm, work, *settings), check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((work / RESULT).read_text())
    assert result["resumed_from_step"] >= killed_at and result["steps"] == 8
    assert [s for s, _ in result["loss_curve"]][-1] == 8


@pytest.mark.integration
def test_training_runs_on_two_processes_under_accelerate_launch(tiny_llm, tmp_path):
    work = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "builder" / "accelerate" / "ddp.yaml"), "--num_processes", "2", "-m",
           *_train_cmd(tiny_llm, work, "llm.max_steps=3", "llm.batch_size=4", "llm.micro_batch_size=2")[2:]]
    done = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((work / RESULT).read_text())
    assert result["processes"] == 2 and result["steps"] == 3
    assert (work / FINAL / "adapter_model.safetensors").is_file()


@pytest.mark.integration
def test_adapter_loads_into_vllm_and_changes_the_output(tiny_llm, trained):
    pytest.importorskip("vllm")
    from core.vllm_engine import generate_offline

    convs = [r["messages"][:-1] for r in _examples(4)]
    # Batches of one group run as one call and are split back in order: "few" is the first two of "base".
    out = generate_offline(str(tiny_llm["base"]), {"base": convs, "few": convs[:2], "none": [], "tuned": convs}, 12,
                           1024, adapter=str(trained / FINAL), lora_batches=["tuned"],
                           serve_cfg=load_config("tiny").serve, timeout=600)
    assert len(out["base"]["texts"]) == len(out["tuned"]["texts"]) == 4
    assert out["base"]["texts"] != out["tuned"]["texts"]
    assert len(out["few"]["texts"]) == 2 and out["none"]["texts"] == [] and out["none"]["tokens"] == 0
    assert out["few"]["tokens"] > 0 and out["few"]["seconds"] <= out["base"]["seconds"] + 0.01


# ----------------------------------------------------------------------------------------------- the stage

def _gate_report(base: list[float], tuned: list[float]) -> dict:
    from builder.stats import paired_bootstrap

    return {"base": {"f1": sum(base) / len(base), "questions": float(len(base))},
            "finetuned": {"f1": sum(tuned) / len(tuned), "questions": float(len(tuned))},
            "finetuned_vs_base": paired_bootstrap(tuned, base)}


def test_gate_ships_only_an_adapter_whose_gain_clears_min_gain():
    base = [0.2, 0.4, 0.0, 0.6] * 10
    better = [f + 0.06 for f in base]  # the same gain on every question: an interval of one point
    ship, why = llm.gate(_gate_report(base, better), 0.05, 0.05, "dev split")
    assert ship and "0.360" in why and "0.300" in why and "interval [+0.060, +0.060]" in why
    ship, why = llm.gate(_gate_report(base, better), 0.10, 0.05, "dev split")
    assert not ship and why.startswith("rejected") and "not above llm.min_gain 0.1" in why
    ship, why = llm.gate({}, 0.0, 0.05, "none")
    assert ship and "no dev questions" in why


def test_gate_ships_a_gain_whose_interval_rules_out_harm_and_keeps_the_base_otherwise():
    base = [0.5] * 30
    noisy = [1.0, 0.0, 0.6] * 10  # mean 0.533 > 0.5, but a win on one question and a loss on the next
    ship, why = llm.gate(_gate_report(base, noisy), 0.0, 0.05, "dev split")
    assert not ship and "loss of more than llm.harm_margin 0.05" in why
    # A large gain on 12 questions, a small loss on 18: the interval crosses zero but rules out a loss of 0.05.
    mixed = [0.7] * 12 + [0.4] * 18  # +0.02 on average
    report = _gate_report(base, mixed)
    assert -0.05 < report["finetuned_vs_base"]["ci"][0] < 0.0
    ship, why = llm.gate(report, 0.0, 0.05, "dev split")
    assert ship and "no loss of more than llm.harm_margin 0.05" in why
    assert not llm.gate(report, 0.0, 0.02, "dev split")[0]  # a stricter margin keeps it out
    worse = [0.45] * 30  # a steady loss is never shipped, however narrow its interval
    assert not llm.gate(_gate_report(base, worse), 0.0, 0.05, "dev split")[0]
    steady = [0.6] * 30
    assert llm.gate(_gate_report(base, steady), 0.0, 0.05, "dev split")[0]


def test_training_questions_are_held_back_for_the_gate_only_when_nothing_else_is_held_out():
    qs = [{"question": f"q{i}?", "answer": "a", "source": None} for i in range(300)]
    gate_q, train_q, where = llm.split_gate([], qs, seed=1)
    assert gate_q and where.startswith("training questions")
    assert not {q["question"] for q in gate_q} & {q["question"] for q in train_q}
    assert len(gate_q) + len(train_q) == 300
    many = [{"question": f"q{i}?", "answer": "a", "source": None} for i in range(3000)]
    gate_q, train_q, _ = llm.split_gate([], many, seed=1)
    assert len(gate_q) == llm.GATE_MAX and len(gate_q) + len(train_q) == 3000
    held = qs[:5]
    assert llm.split_gate(held, qs[5:], 1) == (held, qs[5:], "dev split")
    assert llm.split_gate([], qs[:8], 1) == ([], qs[:8], "none")


def test_a_small_dev_split_is_topped_up_with_generated_dev_questions_to_the_gate_size():
    real = [{"question": f"r{i}?", "answer": "a", "source": None} for i in range(31)]
    made = [{"question": f"g{i}?", "answer": "a", "source": None, "origin": "generated"} for i in range(100)]
    gate_q, train_q, where = llm.split_gate(real, [], 1, made)
    assert gate_q[:31] == real and gate_q[31:] == made[:llm.GATE_MAX - 31] and train_q == []
    assert where == f"questions: 31 of the dev split and {llm.GATE_MAX - 31} generated dev questions"
    big = real * 2
    assert llm.split_gate(big, [], 1, made) == (big, [], "dev split")
    gate_q, _, where = llm.split_gate([], real * 4, 1, made)
    assert where.startswith("training questions") and all(q["question"].startswith("r") for q in gate_q)


def test_merged_weights_follow_the_serving_choice():
    assert llm.wants_merged(load_config("tiny", None, ["serve.use_merged=auto"]), cuda=False)
    assert not llm.wants_merged(load_config("tiny", None, ["serve.use_merged=no"]), cuda=False)
    assert not llm.wants_merged(load_config("tiny", None, ["serve.use_merged=auto"]), cuda=True)
    assert llm.wants_merged(load_config("tiny", None, ["serve.use_merged=auto", "llm.merge=true"]), cuda=True)


def test_int8_weights_are_written_for_a_cpu_unless_quantize_is_none():
    def wants_w8a8(cfg, cuda):
        return cfg.serve.writes_int8(cuda)

    assert wants_w8a8(load_config("tiny"), False) and not wants_w8a8(load_config("tiny", None, ["serve.quantize=none"]), False)
    assert not wants_w8a8(load_config("tiny"), True) and wants_w8a8(load_config("tiny", None, ["serve.quantize=w8a8"]), True)
    with pytest.raises(ConfigError, match="serve.quantize"):
        load_config("tiny", None, ["serve.quantize=int4"])


def test_checkpoint_key_changes_with_the_data_and_settings_but_not_the_gate(tiny_llm, tmp_path):
    data2 = tmp_path / "other.jsonl"
    chat_examples.write_examples(_examples(5), data2)
    key = llm.checkpoint_dir(tmp_path, _cfg(), str(tiny_llm["base"]), tiny_llm["data"])
    assert key == llm.checkpoint_dir(tmp_path, _cfg("llm.min_gain=0.5"), str(tiny_llm["base"]), tiny_llm["data"])
    assert key != llm.checkpoint_dir(tmp_path, _cfg("llm.lora_r=8"), str(tiny_llm["base"]), tiny_llm["data"])
    assert key != llm.checkpoint_dir(tmp_path, _cfg(), str(tiny_llm["base"]), data2)
    assert key.parent == tmp_path / ".checkpoints"


def test_every_shipped_accelerate_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((REPO / "builder" / "accelerate").glob("*.yaml"))
    assert {f.stem for f in files} >= {"ddp", "fsdp", "deepspeed_zero2"}
    for f in files:
        loaded = load_config_from_file(str(f))
        assert loaded.num_processes >= 2
    assert llm.accelerate_config_path("fsdp").name == "fsdp.yaml"
    with pytest.raises(FileNotFoundError):
        llm.accelerate_config_path("no-such-config")


@pytest.mark.integration
def test_llm_stage_writes_the_adapter_loss_curve_chat_data_and_manifest_entry(tiny_bundle_copy):
    from builder.questions import read_questions
    from core.retrieval import load_chunks

    bundle = tiny_bundle_copy
    for sub in ("adapter", "merged"):
        shutil.rmtree(bundle / "llm" / sub, ignore_errors=True)
    held = read_questions(bundle / "eval" / "heldout.jsonl")
    train_q = [dict(q) for q in held]  # the stage only needs some supervision; these are scored, not trained on
    cfg = load_config("tiny", None, ["llm.min_gain=-1", "llm.max_steps=4", "serve.use_merged=yes",
                                     "eval.max_answer_questions=4"])
    entry = llm.run(cfg, bundle / "llm" / "base", load_chunks(bundle / "index"), train_q[:20], held, held, bundle)
    assert entry["adapter"] == "llm/adapter" and entry["merged"] == "llm/merged"
    assert entry["decision"].startswith("shipped")
    assert {"base", "finetuned", "base_no_retrieval"} <= set(entry["metrics"]) and entry["metrics"]["split"] == "test split"
    assert {"base", "finetuned", "finetuned_vs_base"} <= set(entry["dev_metrics"])
    assert entry["training"]["steps"] == 4 and entry["training"]["lora"]["r"] == cfg.llm.lora_r
    assert (bundle / "llm" / "adapter" / "adapter_model.safetensors").is_file()
    assert (bundle / "llm" / "merged" / "config.json").is_file()
    assert (bundle / "eval" / "loss.png").stat().st_size > 1000
    rows = chat_examples.read_examples(bundle / "data" / "chat_train.jsonl")
    assert rows and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert not (bundle.parent / ".checkpoints").exists() or not any((bundle.parent / ".checkpoints").iterdir())


def test_training_steps_grow_with_supervision_within_the_cap():
    from builder.llm import training_steps
    from core.config import LLMConfig

    llm = LLMConfig(max_steps=48, steps_per_question=0.1, steps_cap=96)
    assert training_steps(llm, 100) == 48          # a small FAQ: the floor
    assert training_steps(llm, 887) == 89          # COVID-QA's training questions
    assert training_steps(llm, 5000) == 96         # capped
    assert training_steps(LLMConfig(max_steps=48), 5000) == 48  # off by default
    assert training_steps(LLMConfig(max_steps=120, steps_per_question=0.1, steps_cap=96), 5000) == 120
