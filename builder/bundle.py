"""A versioned, self-describing bundle folder, written atomically.

The bundle is built in ``OUT/.tmp-<id>`` and renamed to ``OUT/<id>`` only when complete; ``OUT/latest`` is a
symlink swapped in one ``os.replace`` after that. An interrupted build (Ctrl-C, kill -9) leaves at most a
``.tmp-*`` folder, never a half bundle, and ``latest`` keeps pointing at the last good one.

Layout::

    manifest.json   id, creation time, builder version, resolved config, knowledge files with sha256,
                    model references with hashes, errors, metrics, decisions
    embedder/       sentence-transformers folder (fine-tuned, or the base when the gate kept it)
    index/          chunks.jsonl (text, source, location, chunk id), dense.faiss, bm25/
    llm/            base.json (reference to the base model), base/ (tiny profile), adapter/ (LoRA), merged/
    eval/           metrics.json, heldout.jsonl, pictures
    data/           the generated training data (embedder pairs, chat examples)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from builder import __version__
from serving.bundle import resolve_bundle  # noqa: F401 - re-exported for the CLI

MANIFEST = "manifest.json"
REQUIRED_KEYS = ("bundle_id", "created_at", "builder_version", "config", "knowledge", "models", "errors",
                 "metrics")


def make_bundle_id(knowledge_dir: Path, file_hashes: list[str], config_json: str) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    h = hashlib.sha256(config_json.encode())
    for fh in sorted(file_hashes):
        h.update(fh.encode())
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in knowledge_dir.resolve().name)[:40] or "kb"
    return f"{name}-{stamp}-{h.hexdigest()[:8]}"


class BundleWriter:
    """Write into a temporary folder; `commit()` renames it into place and moves `latest`."""

    def __init__(self, out_dir: Path, bundle_id: str):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.bundle_id = bundle_id
        self.tmp = self.out_dir / f".tmp-{bundle_id}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        for sub in ("embedder", "index", "llm", "eval", "data"):
            (self.tmp / sub).mkdir()
        self.final = self.out_dir / bundle_id

    def path(self, *parts: str) -> Path:
        return self.tmp.joinpath(*parts)

    def write_json(self, rel: str, data: Any) -> Path:
        p = self.path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        return p

    def write_jsonl(self, rel: str, rows: list[dict]) -> Path:
        p = self.path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return p

    def commit(self, manifest: dict) -> Path:
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise ValueError(f"manifest lacks {missing}")
        self.write_json(MANIFEST, manifest)
        _fsync_tree(self.tmp)
        if self.final.exists():
            raise FileExistsError(f"bundle {self.final} already exists; bundles never change once written")
        os.rename(self.tmp, self.final)
        point_latest(self.out_dir, self.bundle_id)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def point_latest(out_dir: Path, bundle_id: str) -> None:
    link = out_dir / "latest"
    tmp_link = out_dir / f".latest-{os.getpid()}"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(bundle_id, tmp_link)
    os.replace(tmp_link, link)


def _fsync_tree(root: Path) -> None:
    for p in [root / MANIFEST]:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def version() -> str:
    return __version__
