"""Read a bundle: the only thing serving knows about the build is what the manifest says."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"


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
        rel = self.llm_info.get("adapter")
        return str(self.path / rel) if rel and (self.path / rel).exists() else None

    def merged_path(self) -> str | None:
        rel = self.llm_info.get("merged")
        return str(self.path / rel) if rel and (self.path / rel).exists() else None

    def merged_w8a8_path(self) -> str | None:
        """The merged weights as int8 (W8A8, compressed-tensors), written for serving on a CPU."""
        rel = self.llm_info.get("merged_w8a8")
        return str(self.path / rel) if rel and (self.path / rel).exists() else None

    @property
    def top_k(self) -> int:
        from builder.config import RetrievalConfig

        return int(self.manifest.get("retrieval", {}).get("top_k", RetrievalConfig.top_k))

    @property
    def max_new_tokens(self) -> int:
        return int(self.manifest.get("config", {}).get("llm", {}).get("max_new_tokens", 96))
