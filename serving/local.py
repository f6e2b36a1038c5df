"""Answer questions from a bundle in-process with transformers (the `assistant ask` path; no server).

    assistant ask "How much DAP per acre at planting?" --bundle bundles/latest
"""

from __future__ import annotations

from pathlib import Path

from serving.bundle import Bundle
from serving.citations import ground_citations
from serving.focus import bundle_focus
from serving.prompting import build_messages
from serving.retrieval import Retriever


def load_generator(bundle: Bundle, use_adapter: bool = True, device: str = "cpu"):
    """(model, tokenizer) for the bundle's LLM: merged weights, or base + adapter, or base alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = bundle.adapter_path() if use_adapter else None
    base = bundle.base_model_path()
    tok = AutoTokenizer.from_pretrained(adapter or base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
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


class LocalAssistant:
    def __init__(self, bundle: Bundle, retriever: Retriever, model, tok):
        self.bundle, self.retriever, self.model, self.tok = bundle, retriever, model, tok
        self.focus = bundle_focus(bundle, retriever)

    @classmethod
    def load(cls, path: str | Path, use_adapter: bool = True) -> LocalAssistant:
        bundle = Bundle.load(path)
        retriever = Retriever.load(bundle.path)
        model, tok = load_generator(bundle, use_adapter=use_adapter)
        return cls(bundle, retriever, model, tok)

    def answer(self, question: str, top_k: int | None = None) -> dict:
        hits = self.retriever.search(question, k=top_k or self.bundle.top_k, trim=not top_k)
        passages = [h.to_dict() for h in hits]
        messages = build_messages(question, self.focus.apply(question, passages))
        text = generate(self.model, self.tok, [messages], max_new_tokens=self.bundle.max_new_tokens)[0]
        return {"answer": ground_citations(text, passages),
                "sources": [{"source": h.source, "location": h.location, "chunk_id": h.chunk_id,
                             "score": h.score, "text": h.text} for h in hits]}
