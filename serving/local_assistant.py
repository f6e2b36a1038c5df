"""Answer questions from a bundle in-process with transformers (the `assistant ask` path; no server).

    assistant ask "How much DAP per acre at planting?" --bundle bundles/latest
"""

from __future__ import annotations

from pathlib import Path

from core.abstention import bundle_abstainer
from core.bundle import Bundle
from core.citations import ground_citations
from core.focus import bundle_focus
from core.hf_engine import generate, load_generator
from core.prompting import REFUSAL, build_messages
from core.retrieval import Retriever


def bundle_generator(bundle: Bundle, use_adapter: bool = True, device: str = "cpu"):
    """(model, tokenizer) for the bundle's LLM: the base with its adapter, or the base alone."""
    return load_generator(bundle.base_model_path(), bundle.adapter_path() if use_adapter else None, device)


class LocalAssistant:
    def __init__(self, bundle: Bundle, retriever: Retriever, model, tok):
        self.bundle, self.retriever, self.model, self.tok = bundle, retriever, model, tok
        self.focus = bundle_focus(bundle, retriever)
        self.abstainer = bundle_abstainer(bundle, retriever)

    @classmethod
    def load(cls, path: str | Path, use_adapter: bool = True) -> LocalAssistant:
        bundle = Bundle.load(path)
        retriever = Retriever.load(bundle)
        model, tok = bundle_generator(bundle, use_adapter=use_adapter)
        return cls(bundle, retriever, model, tok)

    def answer(self, question: str, top_k: int | None = None) -> dict:
        """{answer, sources, abstained}: the refusal, without asking the model, where the bundle's abstention
        rule says the passages cannot answer (as the gateway does)."""
        found = self.retriever.lookup([question], top_k or self.bundle.top_k, trim=not top_k)[0]
        hits = self.retriever.results(found.ranked)
        sources = [{"source": h.source, "location": h.location, "chunk_id": h.chunk_id, "score": h.score,
                    "text": h.text} for h in hits]
        if self.abstainer.decide(question, found):
            return {"answer": REFUSAL, "sources": sources, "abstained": True}
        passages = [h.to_dict() for h in hits]
        messages = build_messages(question, self.focus.apply(question, passages))
        text = generate(self.model, self.tok, [messages], max_new_tokens=self.bundle.max_new_tokens)[0]
        return {"answer": ground_citations(text, passages), "sources": sources, "abstained": False}
