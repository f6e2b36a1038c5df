"""The bundle format (core/bundle.py): its version in the manifest, the config as the build ran it, bundles of
the format before versions read through one upgrade, and newer or damaged ones refused with a clear message."""

from __future__ import annotations

import json

import pytest

from core.bundle import FORMAT_VERSION, MANIFEST, Bundle, BundleError
from core.retrieval import Retriever


def _manifest(bundle) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def _write(bundle, manifest: dict) -> None:
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))


def test_the_manifest_names_its_format_and_records_the_config_as_it_ran(tiny_bundle):
    m = _manifest(tiny_bundle)
    assert m["format_version"] == FORMAT_VERSION
    # The build chose the fusion on its held-out questions and trained for as many steps as it recorded.
    assert m["config"]["retrieval"]["fusion"] == m["retrieval"]["fusion"] == m["metrics"]["retrieval"]["fusion"]
    assert m["config"]["llm"]["max_steps"] == m["models"]["llm"]["training"]["steps"]
    b = Bundle.load(tiny_bundle)
    assert b.config.retrieval.fusion == b.retrieval.fusion and b.config.profile == "tiny"


def test_a_bundle_from_before_the_format_had_a_version_is_read_as_format_1(tiny_bundle_copy):
    current = Bundle.load(tiny_bundle_copy)
    m = _manifest(tiny_bundle_copy)
    # What builders wrote then: no version, reciprocal rank fusion kept as rrf_k, keys that came later absent.
    del m["format_version"]
    m["retrieval"] = {"mode": m["retrieval"]["mode"], "top_k": m["retrieval"]["top_k"], "candidates": 50,
                      "rrf_k": 30}
    m["config"]["retrieval"]["removed_since"] = 1
    _write(tiny_bundle_copy, m)
    old = Bundle.load(tiny_bundle_copy)
    assert old.format_version == 1
    assert old.retrieval.fusion == "rrf:30" and old.retrieval.mode == current.retrieval.mode
    assert old.passage_tokens == current.passage_tokens  # from the bundle's own config
    served = Retriever.load(old)
    assert served.fusion == "rrf:30" and served.search("maize fertilizer", k=2)


def test_a_bundle_of_a_newer_format_is_refused_with_its_version_and_what_to_do(tiny_bundle_copy):
    m = _manifest(tiny_bundle_copy)
    m["format_version"] = FORMAT_VERSION + 1
    _write(tiny_bundle_copy, m)
    with pytest.raises(BundleError, match=rf"bundle format {FORMAT_VERSION + 1}.*rebuild the bundle"):
        Bundle.load(tiny_bundle_copy)


def test_a_damaged_manifest_is_refused_naming_the_file(tiny_bundle_copy):
    (tiny_bundle_copy / MANIFEST).write_text('{"bundle_id": "x", "config": ')
    with pytest.raises(BundleError, match=rf"{MANIFEST}: not valid JSON \(line 1"):
        Bundle.load(tiny_bundle_copy)


def test_the_command_line_reports_a_refused_bundle_as_an_error_not_a_traceback(tiny_bundle_copy, capsys):
    from assistant.cli import main

    m = _manifest(tiny_bundle_copy)
    m["format_version"] = 99
    _write(tiny_bundle_copy, m)
    assert main(["eval", str(tiny_bundle_copy), "--no-answers"]) == 2
    assert "bundle format 99" in capsys.readouterr().err
