"""The bundle format: its paths, its version, the writer and the typed reader. The only contract between building
and serving; this module is its one owner.

A bundle is written in ``OUT/.tmp-<id>`` and renamed to ``OUT/<id>`` only when complete; ``OUT/latest`` is a
symlink swapped in one ``os.replace`` after that. An interrupted build (Ctrl-C, kill -9) leaves at most a
``.tmp-*`` folder, never a half bundle, and ``latest`` keeps pointing at the last good one. A bundle never
changes once written.

Layout (format 2)::

    manifest.json   format_version, id, creation time, builder version, the config as it ran, knowledge files
                    with sha256, models with hashes, the served retrieval settings, errors, metrics, decisions
    embedder/       sentence-transformers folder (fine-tuned, or the base when the gate kept it)
    embedder-base/  the base embedder, where it was built for this bundle (tiny profile)
    index/          chunks.jsonl, dense.faiss (+ dense_owner.npy), bm25/ (with analyzer.json)
    llm/            base.json (reference to the base model), base/ (tiny profile), adapter/ (LoRA), merged/,
                    merged-w8a8/
    eval/           metrics.json, heldout.jsonl (test split), dev.jsonl, answers.json, loss.png,
                    report.html (the report card)
    data/           the generated training data (embedder pairs, chat examples, base chunk embeddings)

Format 1 is what builders wrote before the format had a version (no ``format_version`` key): it is read, its
manifest brought to format 2 in ``_upgrade_v1`` and nowhere else. A format newer than this reader knows is
refused with a message that says so.

    python -c "from core.bundle import Bundle; b = Bundle.load('bundles/latest'); print(b.format_version, b.retrieval)"
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import __version__
from core.config import BuildConfig, RetrievalConfig, config_from_dict
from core.hashing import file_sha256

FORMAT_VERSION = 2

MANIFEST = "manifest.json"
EMBEDDER_DIR = "embedder"
TINY_EMBEDDER_DIR = "embedder-base"
INDEX_DIR = "index"
# Inside INDEX_DIR:
CHUNKS_FILE = "chunks.jsonl"
FAISS_FILE = "dense.faiss"
FAISS_OWNER_SUFFIX = "_owner.npy"  # beside the FAISS file: the chunk of each vector (absent: one per chunk)
BM25_DIR = "bm25"
ANALYZER_FILE = "analyzer.json"  # inside BM25_DIR
LLM_BASE_REF = "llm/base.json"
TINY_LLM_DIR = "llm/base"
ADAPTER_DIR = "llm/adapter"
MERGED_DIR = "llm/merged"
MERGED_W8A8_DIR = "llm/merged-w8a8"
HELDOUT_FILE = "eval/heldout.jsonl"  # the test split
DEV_FILE = "eval/dev.jsonl"
METRICS_FILE = "eval/metrics.json"
ANSWERS_FILE = "eval/answers.json"
REPORT_FILE = "eval/report.html"  # the report card (builder/report_card.py)
LOSS_PLOT = "eval/loss.png"
DATA_DIR = "data"
PAIRS_FILE = "data/embedder_pairs.jsonl"
CHAT_FILE = "data/chat_train.jsonl"
BASE_EMBEDDINGS_FILE = "data/base_chunk_embeddings.npy"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

REQUIRED_KEYS = ("format_version", "bundle_id", "created_at", "builder_version", "config", "knowledge", "models",
                 "retrieval", "errors", "metrics")


class BundleError(ValueError):
    """A bundle that cannot be read as it is; the message names the file and what to do."""


# ----------------------------------------------------------------------------------------------- chunks

@dataclass(frozen=True)
class Chunk:
    """One indexed passage: a line of index/chunks.jsonl, and what every stage after chunking hands on."""

    chunk_id: str  # a hash of source and text: an unchanged passage keeps its id across rebuilds
    source: str  # the document's path inside the knowledge folder
    location: str  # "page 3, Soil > Liming" etc.
    title: str
    text: str  # what is embedded, indexed and shown: header line + body
    n_tokens: int
    kind: str = "text"  # 'qa' for a question/answer pair

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Chunk:
        return cls(chunk_id=d["chunk_id"], source=d["source"], location=d.get("location", ""),
                   title=d.get("title", ""), text=d["text"], n_tokens=int(d.get("n_tokens", 0)),
                   kind=d.get("kind", "text"))


def write_chunks(path: Path, chunks: list[Chunk]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in chunks)


def read_chunks(path: Path) -> list[Chunk]:
    """The chunk store (index/chunks.jsonl); a damaged line is reported with the file and its number."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                out.append(Chunk.from_dict(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise BundleError(f"{path}:{n}: not a chunk record ({exc}); the bundle is damaged: rebuild it "
                                  "with assistant build") from None
    return out


# ----------------------------------------------------------------------------------------------- served retrieval

@dataclass(frozen=True)
class ServedRetrieval:
    """How the served retriever ranks and what it hands the LLM: the manifest's ``retrieval`` section."""

    mode: str = "hybrid"
    top_k: int = RetrievalConfig.top_k
    candidates: int = RetrievalConfig.candidates
    fusion: str = "rrf:60"  # 'rrf:K' or 'zscore:W'; see core.config.parse_fusion
    passage_gap: float = RetrievalConfig.passage_gap
    first_passage_tokens: int = RetrievalConfig.first_passage_tokens
    passage_tokens: int = RetrievalConfig.passage_tokens

    @classmethod
    def from_config(cls, rcfg: RetrievalConfig, mode: str | None = None) -> ServedRetrieval:
        """The settings a build's retrieval config serves with; 'auto' (not chosen yet) serves hybrid."""
        mode = mode or (rcfg.mode if rcfg.mode != "auto" else "hybrid")
        return cls(mode=mode, top_k=rcfg.top_k, candidates=rcfg.candidates, fusion=rcfg.fusion_spec(),
                   passage_gap=rcfg.passage_gap, first_passage_tokens=rcfg.first_passage_tokens,
                   passage_tokens=rcfg.passage_tokens)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- writing

def make_bundle_id(knowledge_dir: Path, file_hashes: list[str], config_json: str) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    h = hashlib.sha256(config_json.encode())
    for fh in sorted(file_hashes):
        h.update(fh.encode())
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in knowledge_dir.resolve().name)[:40] or "kb"
    return f"{name}-{stamp}-{h.hexdigest()[:8]}"


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def make_manifest(*, bundle_id: str, config: BuildConfig, retrieval: ServedRetrieval, **sections: Any) -> dict:
    """The manifest of a format-2 bundle: ``config`` is the config as the build ran it, ``retrieval`` what serving
    will do; ``sections`` are the rest (knowledge, models, index, data, errors, warnings, skipped, metrics,
    timing)."""
    return {"format_version": FORMAT_VERSION, "bundle_id": bundle_id, "created_at": now_iso(),
            "builder_version": __version__, "profile": config.profile, "config": config.to_dict(),
            "retrieval": retrieval.to_dict(), **sections}


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
        for sub in (EMBEDDER_DIR, INDEX_DIR, "llm", "eval", DATA_DIR):
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
        manifest = {**manifest, CONTENTS_KEY: inventory(self.tmp)}
        self.write_json(MANIFEST, manifest)
        with open(self.tmp / MANIFEST, "rb") as fh:
            os.fsync(fh.fileno())
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


# ----------------------------------------------------------------------------------------------- contents

# The manifest lists every file of the bundle with its size and sha256 (``contents``). Every load checks that
# each is there at its size, and hashes the index (what retrieval reads, small: a damaged index answers wrong
# without an error); `assistant verify` hashes every file.
CONTENTS_KEY = "contents"
HASHED_ON_LOAD = (INDEX_DIR + "/",)


def inventory(folder: Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under ``folder`` but the manifest."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != MANIFEST:
            out[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return out


def check_contents(path: Path, manifest: dict, full: bool = False) -> list[str]:
    """What is wrong with a bundle's files against its manifest's ``contents`` (empty: nothing): missing files,
    sizes that differ, and hashes that differ (the index's always, every file's with ``full``). Reads only."""
    problems = []
    for rel, want in (manifest.get(CONTENTS_KEY) or {}).items():
        f = Path(path) / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != want.get("size"):
            problems.append(f"{rel} has {f.stat().st_size:,} bytes, the manifest says {want.get('size'):,}")
        elif (full or rel.startswith(HASHED_ON_LOAD)) and file_sha256(f) != want.get("sha256"):
            problems.append(f"{rel} does not match its sha256 in the manifest (changed or damaged)")
    return problems


# ----------------------------------------------------------------------------------------------- reading

def resolve_bundle(path: str | Path) -> Path:
    """A bundle folder, or a bundles folder (then its `latest`). Raises FileNotFoundError with advice."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p.resolve()
    if (p / "latest" / MANIFEST).is_file():
        return (p / "latest").resolve()
    raise FileNotFoundError(f"no bundle at {p}: expected {p / MANIFEST} or {p / 'latest' / MANIFEST}. "
                            "Build one with: assistant build KNOWLEDGE_DIR --out bundles")


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{file}: not valid JSON (line {exc.lineno}, column {exc.colno}); the bundle is "
                          "damaged: rebuild it with assistant build") from None
    if not isinstance(data, dict):
        raise BundleError(f"{file}: expected a JSON object; rebuild the bundle with assistant build")
    return data


def _upgrade_v1(path: Path, manifest: dict) -> dict:
    """A format-1 manifest (no format_version) as format 2. Format 1 kept the fusion as ``retrieval.rrf_k`` when
    it was reciprocal rank fusion, and may lack retrieval keys added later, which then take the values of the
    bundle's own config (else the defaults); config keys unknown to this builder are dropped."""
    if not (path / INDEX_DIR / BM25_DIR / ANALYZER_FILE).is_file() and (path / INDEX_DIR / BM25_DIR).is_dir():
        raise BundleError(f"{path}: a format 1 bundle from before the BM25 analyzer was recorded "
                          f"({INDEX_DIR}/{BM25_DIR}/{ANALYZER_FILE} is missing); this builder reads format "
                          f"{FORMAT_VERSION}: rebuild it with assistant build")
    m = dict(manifest)
    config = _known_keys(m.get("config") or {}, BuildConfig())
    rcfg = config.get("retrieval", {})
    r = dict(m.get("retrieval") or {})
    if not r.get("fusion"):
        r["fusion"] = f"rrf:{int(r.get('rrf_k', rcfg.get('rrf_k', RetrievalConfig.rrf_k)))}"
    r.pop("rrf_k", None)
    for f in dataclasses.fields(ServedRetrieval):
        r.setdefault(f.name, rcfg.get(f.name, f.default) if f.name != "mode" else "hybrid")
    m.update(config=config, retrieval=r, format_version=FORMAT_VERSION)
    return m


def _known_keys(data: dict, schema: Any) -> dict:
    """``data`` without the keys the config dataclass ``schema`` does not have (recursively)."""
    out = {}
    for f in dataclasses.fields(schema):
        if f.name in data:
            sub = getattr(schema, f.name)
            out[f.name] = (_known_keys(data[f.name], sub) if dataclasses.is_dataclass(sub)
                           and isinstance(data[f.name], dict) else data[f.name])
    return out


@dataclass
class Bundle:
    """A bundle as serving and evaluation see it: the manifest, its config typed, its served retrieval settings."""

    path: Path
    manifest: dict
    config: BuildConfig = field(repr=False)
    retrieval: ServedRetrieval
    format_version: int

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        p = resolve_bundle(path)
        manifest = _read_manifest(p)
        version = manifest.get("format_version", 1)
        if version == 1:
            manifest = _upgrade_v1(p, manifest)
        elif version != FORMAT_VERSION:
            raise BundleError(f"{p / MANIFEST}: bundle format {version!r}, and this builder reads formats 1 and "
                              f"{FORMAT_VERSION}: rebuild the bundle with this builder (assistant build), or serve "
                              "it with the builder that wrote it")
        problems = check_contents(p, manifest)
        if problems:
            more = f" (and {len(problems) - 1} more: assistant verify {p} lists them)" if len(problems) > 1 else ""
            raise BundleError(f"{p}: {problems[0]}{more}; the bundle is damaged: restore it or rebuild it with "
                              "assistant build")
        try:
            config = config_from_dict(manifest.get("config") or {})
            retrieval = ServedRetrieval(**manifest["retrieval"])
        except (ValueError, TypeError, KeyError) as exc:
            raise BundleError(f"{p / MANIFEST}: {exc}; rebuild the bundle with assistant build") from None
        return cls(p, manifest, config, retrieval, int(version))

    def file(self, rel: str) -> Path:
        """A path inside the bundle, from one of this module's constants."""
        return self.path / rel

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def llm_info(self) -> dict:
        return self.manifest.get("models", {}).get("llm", {})

    @property
    def embedder_info(self) -> dict:
        return self.manifest.get("models", {}).get("embedder", {})

    @property
    def served_model_name(self) -> str:
        """The name the bundle is served under (serve.served_model_name, 'assistant' by default)."""
        return str(self.config.serve.served_model_name or "assistant")

    def base_model_path(self) -> str:
        """Local folder (or hub id) of the base LLM; the packaged SmolLM2 is converted again if its cache is gone."""
        ref = self.llm_info.get("base") or json.loads(self.file(LLM_BASE_REF).read_text())
        raw = ref["path"]
        p = Path(raw)
        if not p.is_absolute():
            p = self.path / p
        if p.exists():
            return str(p)
        if ref.get("name") == "smollm2":
            from core.models import convert_smollm2

            return str(convert_smollm2())
        return raw  # a hub id

    def base_embedder_path(self) -> Path:
        """The base embedder the bundle's embedder was fine-tuned from (converted or located again if needed)."""
        ref = self.embedder_info.get("base") or {}
        path = Path(ref.get("path", ""))
        if ref.get("path") and not path.is_absolute():
            path = self.path / path
        if ref.get("path") and path.exists():
            return path
        from core.models import resolve_embedder

        return Path(resolve_embedder(ref.get("name", "minilm")))

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
    def abstention(self) -> dict:
        """The manifest's ``abstention`` section: the calibrated rule (core.abstention) and how it was chosen;
        {} for bundles built before abstention, which always answer."""
        return self.manifest.get("abstention") or {}

    @property
    def top_k(self) -> int:
        return self.retrieval.top_k

    @property
    def passage_tokens(self) -> tuple[int, int]:
        """(first passage, later passages) token budgets of the LLM's passages; 0 is whole (core/focus.py)."""
        return self.retrieval.first_passage_tokens, self.retrieval.passage_tokens

    def tokenizer_path(self) -> str:
        """A folder with the LLM's tokenizer: the adapter's or merged weights' copy, else the base model."""
        for d in (self.adapter_path(), self.merged_path()):
            if d and any((Path(d) / f).exists() for f in TOKENIZER_FILES):
                return d
        return self.base_model_path()

    @property
    def max_new_tokens(self) -> int:
        return int(self.config.llm.max_new_tokens)
