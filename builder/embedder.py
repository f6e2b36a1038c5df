"""Fine-tune the sentence-transformers embedder on the knowledge base (MNRL with mined hard negatives).

When fine-tuning is off (or there is nothing to train on) the base embedder is copied into the bundle as is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from builder.config import BuildConfig


def copy_base(base: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(base, out_dir, ignore=shutil.ignore_patterns(".git*", "README.md", "*.onnx", "onnx",
                                                                 "openvino", "*.h5", "*.msgpack", "*.ot"))


def run(cfg: BuildConfig, base: Path, chunks: list[dict], train_questions: list[dict], out_dir: Path,
        data_dir: Path, device: str = "cpu") -> dict:
    """Write the bundle's embedder/ folder; return the manifest entry (decision and metrics)."""
    copy_base(Path(base), out_dir)
    return {"path": "embedder", "finetuned": False,
            "decision": "fine-tuning disabled" if not cfg.embedder.finetune else "fine-tuning not run"}
