"""Shared fixtures: tiny bundles are built once per test session and shared (copy before modifying)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
KNOWLEDGE = REPO / "knowledge"
OUTPUT = REPO / "tests" / "output"  # artifacts kept after the run (screenshots, logs)


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    return OUTPUT


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A tiny-profile bundle built from knowledge/ (random tiny models, seconds)."""
    from builder.pipeline import build
    from core.config import load_config

    out = tmp_path_factory.mktemp("bundles")
    return build(load_config("tiny"), KNOWLEDGE, out)


@pytest.fixture
def tiny_bundle_copy(tiny_bundle, tmp_path) -> Path:
    dst = tmp_path / tiny_bundle.name
    shutil.copytree(tiny_bundle, dst)
    return dst
