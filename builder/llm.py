"""LoRA supervised fine-tuning of the base LLM on retrieval-augmented chat examples (PEFT)."""

from __future__ import annotations

from pathlib import Path

from builder.config import BuildConfig


def run(cfg: BuildConfig, base: Path | str, chunks: list[dict], train_questions: list[dict],
        heldout: list[dict], bundle_dir: Path, device: str = "cpu") -> dict:
    """Write llm/adapter/ when an adapter ships; return the manifest entry (decision, metrics)."""
    return {"adapter": None, "merged": None,
            "decision": "fine-tuning disabled" if not cfg.llm.finetune else "fine-tuning not run"}
