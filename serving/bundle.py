"""Read a bundle: the only thing serving knows about the build is what the manifest says."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from builder.config import RetrievalConfig

MANIFEST = "manifest.json"
# For a manifest without these keys (hand-made, or written before the key existed): the config defaults.
DEFAULT_TOP_K = RetrievalConfig.top_k
DEFAULT_PASSAGE_TOKENS = (RetrievalConfig.first_passage_tokens, RetrievalConfig.passage_tokens)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve_bundle(path: str | Path) -> Path:
    """A bundle folder, or a bundles folder (then its `latest`). Raises FileNotFoundError with advice."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p.resolve()
    if (p / "latest" / MANIFEST).is_file():
        return (p / "latest").resolve()
    raise FileNotFoundError(f"no bundle at {p}: expected {p / MANIFEST} or {p / 'latest' / MANIFEST}. "
                            "Build one with: assistant build KNOWLEDGE_DIR --out bundles")


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        p = resolve_bundle(path)
        return cls(p, json.loads((p / MANIFEST).read_text()))

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def llm_info(self) -> dict:
        return self.manifest.get("models", {}).get("llm", {})

    def base_model_path(self) -> str:
        """Local folder (or hub id) of the base LLM; the packaged SmolLM2 is converted again if its cache is gone."""
        ref = self.llm_info.get("base") or json.loads((self.path / "llm" / "base.json").read_text())
        raw = ref["path"]
        p = Path(raw)
        if not p.is_absolute():
            p = self.path / p
        if p.exists():
            return str(p)
        if ref.get("name") == "smollm2":
            from builder.models import convert_smollm2

            return str(convert_smollm2())
        return raw  # a hub id

    def adapter_path(self) -> str | None:
        return self._llm_file("adapter")

    def merged_path(self) -> str | None:
        return self._llm_file("merged")

    def merged_w8a8_path(self) -> str | None:
        """The merged weights as int8 (W8A8, compressed-tensors), written for serving on a CPU."""
        return self._llm_file("merged_w8a8")

    def _llm_file(self, key: str) -> str | None:
        """The folder the manifest's models.llm.<key> names, if it is there."""
        rel = self.llm_info.get(key)
        return str(self.path / rel) if rel and (self.path / rel).exists() else None

    @property
    def top_k(self) -> int:
        return int(self.manifest.get("retrieval", {}).get("top_k", DEFAULT_TOP_K))

    @property
    def passage_tokens(self) -> tuple[int, int]:
        """(first passage, later passages) token budgets of the LLM's passages; 0 is whole (serving/focus.py)."""
        r = self.manifest.get("retrieval", {})
        return (int(r.get("first_passage_tokens", DEFAULT_PASSAGE_TOKENS[0])),
                int(r.get("passage_tokens", DEFAULT_PASSAGE_TOKENS[1])))

    def tokenizer_path(self) -> str:
        """A folder with the LLM's tokenizer: the adapter's or merged weights' copy, else the base model."""
        for d in (self.adapter_path(), self.merged_path()):
            if d and any((Path(d) / f).exists() for f in TOKENIZER_FILES):
                return d
        return self.base_model_path()

    @property
    def max_new_tokens(self) -> int:
        return int(self.manifest.get("config", {}).get("llm", {}).get("max_new_tokens", 96))
