"""Generation with transformers in-process: the tokenizer and model loaders, batched greedy answers, and the
adapter merge. `assistant ask`, the gateway's --no-vllm upstream and the evaluation's 'hf' engine all use it.

    python -c "from core.hf_engine import load_generator, generate; m, t = load_generator('bundles/latest/llm/merged'); \
print(generate(m, t, [[{'role': 'user', 'content': 'Hello'}]]))"
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path


def load_tokenizer(path: str | Path):
    """The model's tokenizer with a pad token, and the ChatML template where it has none (tiny models)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        from core.models import CHATML_TEMPLATE

        tok.chat_template = CHATML_TEMPLATE
    return tok


def load_generator(base: str, adapter: str | None = None, device: str = "cpu"):
    """(model, tokenizer): the base weights in fp32 with the LoRA adapter on top where given, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(adapter or base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.to(device).eval()
    return model, tok


def generate(model, tok, conversations: list[list[dict]], max_new_tokens: int = 96, batch_size: int = 8) -> list[str]:
    """Greedy answers for a list of chat conversations, batched with left padding."""
    import torch

    tok.padding_side = "left"
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tok(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                    add_special_tokens=False).to(model.device)
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for row in gen[:, batch["input_ids"].shape[1]:]:
            out.append(tok.decode(row, skip_special_tokens=True).strip())
    return out


def generate_batches(model_path: str, batches: dict[str, list[list[dict]]], max_new_tokens: int,
                     adapter: str | None = None, device: str = "cpu",
                     lora_batches: Sequence[str] | None = None) -> dict[str, dict]:
    """Answers for named batches of conversations with one model; with ``adapter``, the batches not named in
    ``lora_batches`` (when given) are answered by the base weights. {batch: {"texts", "tokens", "seconds"}},
    as core.vllm_engine.generate_offline returns them."""
    model, tok = load_generator(model_path, adapter, device)
    out = {}
    for name, convs in batches.items():
        start = time.perf_counter()
        plain = adapter and lora_batches is not None and name not in lora_batches
        with model.disable_adapter() if plain else contextlib.nullcontext():
            texts = generate(model, tok, convs, max_new_tokens=max_new_tokens) if convs else []
        out[name] = {"texts": texts, "seconds": round(time.perf_counter() - start, 2),
                     "tokens": sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)}
    return out


def merge_adapter(base: str, adapter: str, out: Path) -> Path:
    """Full weights with the LoRA update folded in (in the base model's dtype), plus the adapter's tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    dtype = getattr(model.config, "dtype", None) or "float32"
    dtype = getattr(torch, str(dtype).replace("torch.", ""), torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    merged.to(dtype).save_pretrained(out, safe_serialization=True)
    load_tokenizer(adapter).save_pretrained(out)
    return out
