"""LoRA supervised fine-tuning of a causal LM on chat examples (PEFT + the transformers Trainer).

The build calls ``train()`` in-process on one device. The same module is the entry point for
``accelerate launch``, so training scales past one GPU without a code change; the configs shipped in
``builder/accelerate/`` are:

- ``ddp.yaml``: data parallel, one process per device (2 processes; with no CUDA they are CPU processes
  talking over gloo, which is how the tests run the distributed path on a laptop);
- ``fsdp.yaml``: FSDP (full shard, transformer-block wrapping), for base models that do not fit one GPU;
- ``deepspeed_zero2.yaml``: DeepSpeed ZeRO-2 (optimizer state and gradients sharded; needs ``pip install
  deepspeed``).

Set ``num_processes`` in the file (or pass ``--num_processes``) to the number of GPUs. The build launches it
itself when ``llm.accelerate_config`` names one of them (or a path)::

    assistant build knowledge --profile gpu --set llm.accelerate_config=fsdp

and by hand (data from a bundle's ``data/chat_train.jsonl``, settings from its resolved config)::

    accelerate launch --config_file builder/accelerate/ddp.yaml -m builder.lora_trainer \\
        --data /tmp/b/data/chat_train.jsonl --base /tmp/b/llm/base --work /tmp/lora-run --profile tiny

What is trained: LoRA adapters (rank, alpha, dropout, target modules from ``llm.*``) on the base model's own
chat template; the loss covers the assistant's tokens only (the prompt and the passages are masked with -100),
and logits are computed only from the first answer token of the batch on, which spares most of the
vocabulary projection. Examples are grouped by length so micro-batches carry little padding. Checkpoints go to
``WORK/checkpoint-N`` every ``llm.checkpoint_every`` steps; a run started again with the same WORK resumes from
the last one. The adapter (with the tokenizer) is saved to ``WORK/final`` and a summary to
``WORK/result.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from builder.chat_examples import read_examples
from core.config import load_config
from core.device import autocast_dtype, get_device, get_dtype, set_threads
from core.hf_engine import load_tokenizer

FINAL = "final"
RESULT = "result.json"
IGNORE = -100


# ----------------------------------------------------------------------------------------------- data

def encode_example(tok, messages: Sequence[dict], max_seq_len: int) -> dict | None:
    """input_ids and labels for one conversation whose last message is the assistant's target.

    The prompt is rendered by the tokenizer's chat template with the generation prompt, exactly as serving
    renders it; the labels are -100 over it and the token ids over the answer and its end-of-turn token
    (the template's trailing newline after that token is not trained). None when it does not fit."""
    prompt = tok.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(list(messages), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without the answer")
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    if eos in answer_ids:
        answer_ids = answer_ids[:answer_ids.index(eos) + 1]
    else:
        answer_ids = answer_ids + [eos]
    if len(prompt_ids) + len(answer_ids) > max_seq_len:
        return None
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE] * len(prompt_ids) + answer_ids}


class ChatDataset:
    """Encoded examples in a list (a map-style dataset the Trainer's length-grouped sampler can measure)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class Collator:
    """Right-pads a micro-batch and says from which position logits are needed (``logits_to_keep``)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.tokens = 0  # real (non-pad) tokens seen, for tokens per second

    def __call__(self, features: list[dict]) -> dict:
        import torch

        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for row, f in enumerate(features):
            k = len(f["input_ids"])
            ids[row, :k] = torch.tensor(f["input_ids"])
            labels[row, :k] = torch.tensor(f["labels"])
            mask[row, :k] = 1
        self.tokens += int(mask.sum())
        # Position p predicts token p + 1, so logits are needed from one before the first labelled token.
        labelled = (labels != IGNORE).any(dim=0).nonzero()
        first = int(labelled[0]) if len(labelled) else n - 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "logits_to_keep": n - max(first - 1, 0)}


def masked_lm_loss(outputs, labels, num_items_in_batch=None):
    """Next-token cross-entropy over the labelled (assistant) tokens only, for logits that cover the last K
    positions; summed and divided by the labelled tokens of the whole accumulated batch when given."""
    import torch.nn.functional as F

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    k = logits.shape[1]
    n = labels.shape[1]
    targets = labels[:, n - k + 1:]
    logits = logits[:, :-1, :] if k > 1 else logits[:, :0, :]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    if num_items_in_batch is None:
        return loss / max(1, int((targets != IGNORE).sum()))
    return loss / num_items_in_batch


# ----------------------------------------------------------------------------------------------- model

def lora_config(llm_cfg):
    from peft import LoraConfig

    return LoraConfig(r=llm_cfg.lora_r, lora_alpha=llm_cfg.lora_alpha, lora_dropout=llm_cfg.lora_dropout,
                      target_modules=list(llm_cfg.target_modules), bias="none", task_type="CAUSAL_LM")


def lora_settings(llm_cfg) -> dict:
    return {"r": llm_cfg.lora_r, "alpha": llm_cfg.lora_alpha, "dropout": llm_cfg.lora_dropout,
            "target_modules": list(llm_cfg.target_modules), "learning_rate": llm_cfg.learning_rate,
            "batch_size": llm_cfg.batch_size, "micro_batch_size": llm_cfg.micro_batch_size,
            "max_seq_len": llm_cfg.max_seq_len}


def last_checkpoint(work: Path) -> Path | None:
    """The highest-step checkpoint whose trainer state was written completely (a kill can leave a partial one)."""
    done = [p for p in work.glob("checkpoint-*") if (p / "trainer_state.json").is_file()
            and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1])) if done else None


def _mixed_precision(device: str) -> str | None:
    """'bf16' / 'fp16' / None for the Trainer, from core.device (the one place dtype is decided): the GPU's
    dtype, or bf16 autocast on a CPU that multiplies bf16 natively."""
    import torch

    dt = get_dtype(device) if device.startswith("cuda") else autocast_dtype(device)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt)


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class _Clock:
    """Wall time of the steps run in this process (not of model loading)."""

    def __init__(self):
        self.start = 0.0

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_train_begin(self, *a, **kw):
                clock.start = time.perf_counter()
        return Clock()


def make_trainer(cfg, base: str | Path, data: str | Path, work: str | Path, device: str | None = None,
                 progress: bool = True):
    """The Trainer for a run (PEFT model, length-grouped examples, masked loss), with ``trainer.collator``,
    ``trainer.clock``, ``trainer.examples`` and ``trainer.dropped`` attached for the summary."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    set_threads()
    llm = cfg.llm
    device = device or get_device(cfg.device)
    torch.manual_seed(cfg.seed)

    tok = load_tokenizer(base)
    encoded, dropped = [], 0
    for row in read_examples(data):
        e = encode_example(tok, row["messages"], llm.max_seq_len)
        if e is None:
            dropped += 1
        else:
            encoded.append(e)
    if not encoded:
        raise ValueError(f"no training example fits llm.max_seq_len={llm.max_seq_len} ({dropped} too long)")

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=get_dtype(device))
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(llm))

    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = max(1, min(llm.micro_batch_size, llm.batch_size))
    accumulation = max(1, math.ceil(llm.batch_size / (micro * world)))
    precision = _mixed_precision(device)
    on_cpu = not device.startswith(("cuda", "mps"))
    args = TrainingArguments(
        output_dir=str(work), max_steps=llm.max_steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation, learning_rate=llm.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=max(1, int(0.06 * llm.max_steps)), weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="steps", save_steps=max(1, llm.checkpoint_every), save_total_limit=2,
        train_sampling_strategy="group_by_length", remove_unused_columns=False, report_to="none",
        seed=cfg.seed, data_seed=cfg.seed, use_cpu=on_cpu, bf16=precision == "bf16", fp16=precision == "fp16",
        ddp_backend="gloo" if on_cpu and world > 1 else None, ddp_find_unused_parameters=False,
        disable_tqdm=not progress, dataloader_num_workers=0,
    )
    collator = Collator(tok.pad_token_id)
    clock = _Clock()
    trainer = Trainer(model=model, args=args, train_dataset=ChatDataset(encoded), data_collator=collator,
                      processing_class=tok, compute_loss_func=masked_lm_loss, callbacks=[clock.callback()])
    if trainer.is_fsdp_enabled:
        from peft.utils.other import fsdp_auto_wrap_policy

        trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
    trainer.collator, trainer.clock = collator, clock
    trainer.examples, trainer.dropped = len(encoded), dropped
    trainer.run_info = {"device": device, "precision": precision or "fp32", "processes": world}
    return trainer


def train(cfg, base: str | Path, data: str | Path, work: str | Path, device: str | None = None,
          progress: bool = True) -> dict:
    """Train LoRA adapters on the chat examples in ``data`` (JSONL of {"messages"}); returns a summary dict.

    ``work`` holds the checkpoints, the final adapter (``work/final``) and the summary (``work/result.json``).
    A run whose ``work`` already has ``final`` returns its summary without training again."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if (work / FINAL / "adapter_config.json").is_file() and (work / RESULT).is_file():
        return json.loads((work / RESULT).read_text())
    trainer = make_trainer(cfg, base, data, work, device, progress)
    resume = last_checkpoint(work)
    resumed_from = int(resume.name.split("-")[-1]) if resume else 0
    out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - trainer.clock.start

    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(work / FINAL))  # every rank must enter it under FSDP; rank 0 writes
    history = [h for h in trainer.state.log_history if "loss" in h]
    world = trainer.run_info["processes"]
    tokens = trainer.collator.tokens * world
    steps_run = trainer.state.global_step - resumed_from
    result = {
        "steps": int(trainer.state.global_step), "examples": trainer.examples,
        "dropped_too_long": trainer.dropped, "resumed_from_step": resumed_from, "seconds": round(seconds, 1),
        "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else 0.0,
        "steps_per_s": round(steps_run / seconds, 4) if seconds > 0 else 0.0,
        "final_loss": history[-1]["loss"] if history else None, "train_loss": round(float(out.training_loss), 4),
        **trainer.run_info, "lora": lora_settings(cfg.llm), "loss_curve": [[h["step"], h["loss"]] for h in history],
    }
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(work / FINAL))
        tmp = work / f".{RESULT}.tmp"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, work / RESULT)
    if _distributed():
        trainer.accelerator.wait_for_everyone()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="LoRA SFT on chat examples (runs under accelerate launch).")
    ap.add_argument("--data", required=True, help="JSONL of chat examples ({\"messages\": [...]}) per line")
    ap.add_argument("--base", required=True, help="base model folder (or hub id)")
    ap.add_argument("--work", required=True, help="checkpoints, final adapter and result.json go here")
    ap.add_argument("--profile", default=None, help="tiny, cpu or gpu (default: by the machine)")
    ap.add_argument("--config", default=None, help="YAML/JSON settings file (e.g. a bundle's resolved config)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(args.profile, args.config, args.overrides)
    result = train(cfg, args.base, args.data, args.work, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
