"""Content hashes (for the manifest and caches) and hash-based fractions (for every deterministic split)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_sha256(folder: Path) -> str:
    """One hash over a folder's files (names and contents), for the manifest."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()


def stable_fraction(key: str, seed: int = 0) -> float:
    """A number in [0, 1) fixed by the key and seed: the basis of every deterministic split."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def ids_digest(ids: Iterable[str]) -> str:
    """Ties a cache to the exact list (and order) of ids it was computed for."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]
