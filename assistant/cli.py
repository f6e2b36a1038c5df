"""The `assistant` command: build, serve, ask, eval. It parses arguments and calls the library, nothing more;
it is the only module that imports both the builder and the server.

    assistant build knowledge --profile tiny --out /tmp/bundles
    assistant ask "When should I top-dress maize?" --bundle /tmp/bundles/latest
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from core.bundle import BundleError
from core.config import PROFILES, ConfigError, allowed_range, describe_fields


def _config_epilog() -> str:
    lines = ["configuration keys (set with --set key=value; defaults before the profile is applied):"]
    for key, default, help_text in describe_fields():
        allowed = allowed_range(key)
        lines.append(f"  {key} = {json.dumps(default)}" + (f"  ({allowed})" if allowed else ""))
        lines.extend(textwrap.wrap(help_text, width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=PROFILES, default=None,
                   help="tiny: random tiny models for tests; cpu: the embedded SmolLM2 + MiniLM (default without "
                        "CUDA); gpu: a real base model in bf16 (default with CUDA)")
    p.add_argument("--config", metavar="FILE", help="YAML file of settings, applied after the profile")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one setting, e.g. --set llm.max_steps=50 (repeatable; see the keys below)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="assistant",
        description="Build a fine-tuned, retrieval-augmented assistant from a folder of documents, and serve it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with: assistant build knowledge && assistant serve bundles/latest")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="ingest a knowledge folder, fine-tune, index, evaluate, write a bundle",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_config_epilog(),
                       description="Ingest every file of KNOWLEDGE_DIR (Markdown, text, HTML, PDF, DOCX, CSV, "
                                   "*.qa.jsonl), fine-tune the embedder and the LLM, index the chunks in FAISS, "
                                   "evaluate, and write a versioned bundle to OUT/<bundle-id>. OUT/latest moves "
                                   "only once the bundle is complete. The last line printed is the bundle path.")
    b.add_argument("knowledge_dir", metavar="KNOWLEDGE_DIR", help="folder of documents to build from")
    b.add_argument("--out", default="bundles", help="bundles folder (default: bundles)")
    b.add_argument("--questions", metavar="FILE.jsonl",
                   help="extra training questions, one {\"question\", \"answer\", \"source\"} per line; "
                        "used for training only, never indexed")
    _add_config_args(b)

    s = sub.add_parser("serve", help="serve a bundle: vLLM + OpenAI-compatible RAG gateway + Gradio chat UI",
                       description="Start vLLM with the bundle's model and LoRA adapter, the RAG gateway "
                                   "(/v1/chat/completions, /v1/models, /v1/retrieve) and the chat UI at /.")
    s.add_argument("bundle", nargs="?", default="bundles", help="a bundle folder or a bundles folder (its latest)")
    s.add_argument("--host", default="127.0.0.1", help="gateway host (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=7860, help="gateway and UI port (default 7860)")
    s.add_argument("--vllm-port", type=int, default=8000, help="port of the vLLM server (default 8000)")
    s.add_argument("--api-key-file", metavar="FILE", default=None,
                   help="require the key on this file's first line as a bearer key on the gateway, vLLM and "
                        "the UI; without it, env ASSISTANT_API_KEY. There is no --api-key: a key on a command "
                        "line is visible to every local user")
    # Not an option: a key on a command line is visible to every local user; this only says so.
    s.add_argument("--api-key", dest="api_key_given", default=None, help=argparse.SUPPRESS)
    s.add_argument("--max-pending", type=int, default=128,
                   help="answers in flight past which a new request gets 429 with Retry-After (default 128)")
    s.add_argument("--allow-open", action="store_true",
                   help="serve on a non-loopback --host without any key (refused otherwise)")
    s.add_argument("--no-vllm", action="store_true",
                   help="generate with transformers in-process instead of starting vLLM (debugging only)")
    s.add_argument("--vllm-log", metavar="FILE", default=None,
                   help="where vLLM's output goes (default logs/vllm-VLLM_PORT.log)")
    s.add_argument("--vllm-arg", metavar="ARG", action="append", default=[], dest="vllm_args",
                   help="extra argument for vLLM, repeatable, e.g. --vllm-arg=--dtype --vllm-arg=float32")
    s.add_argument("--ready-timeout", type=float, default=900.0,
                   help="seconds to wait for vLLM to load the model (default 900)")

    a = sub.add_parser("ask", help="answer one question from a bundle, with cited sources")
    a.add_argument("question", help="the question")
    a.add_argument("--bundle", default="bundles", help="a bundle folder or a bundles folder (its latest)")
    a.add_argument("--json", action="store_true", help="print {answer, sources[]} as JSON")
    a.add_argument("--top-k", type=int, default=None, help="passages to give the model, exactly (default: the bundle's retrieval.top_k, "
                   "less those scoring far behind the best: retrieval.passage_gap)")
    a.add_argument("--base", action="store_true", help="answer with the base model, ignoring the adapter")

    v = sub.add_parser("verify", help="check every file of a bundle against the sha256 in its manifest",
                       description="Hash every file the manifest lists and report any missing, resized or "
                                   "changed one (serving checks sizes and the index's hashes at every load). "
                                   "Exit status 1 when something is wrong.")
    v.add_argument("bundle", nargs="?", default="bundles", help="a bundle folder or a bundles folder (its latest)")

    e = sub.add_parser("eval", help="evaluate a bundle's retrieval (and answers) on a question file")
    e.add_argument("bundle", help="a bundle folder or a bundles folder (its latest)")
    e.add_argument("--questions", metavar="FILE.jsonl", default=None,
                   help="questions with gold answers and sources (default: the bundle's held-out split)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--no-answers", action="store_true", help="retrieval metrics only (skip generation)")
    e.add_argument("--limit", type=int, default=None, help="score answers on at most this many questions")
    e.add_argument("--unanswerable", default=None, metavar="FILE",
                   help="questions the knowledge base cannot answer (about documents left out of the build), "
                        "one per line or {\"question\"} per JSONL line; the refusal on them is reported as "
                        "refusal_by_kind.not_indexed")
    e.add_argument("--report", metavar="FILE.html", default=None,
                   help="also write the report card (one self-contained HTML page with plots) for these questions")
    return parser


def cmd_build(args: argparse.Namespace) -> int:
    from builder.pipeline import NothingToIngest, build, clean_stale_tmp
    from core.config import load_config
    from core.log import install_interrupt_handler

    install_interrupt_handler()
    cfg = load_config(args.profile, args.config, args.overrides)
    knowledge = Path(args.knowledge_dir)
    if not knowledge.is_dir():
        print(f"error: knowledge folder not found: {knowledge}", file=sys.stderr)
        return 2
    clean_stale_tmp(Path(args.out))
    try:
        path = build(cfg, knowledge, args.out, questions_file=args.questions)
    except NothingToIngest as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(path)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from serving.local_assistant import LocalAssistant

    assistant = LocalAssistant.load(args.bundle, use_adapter=not args.base)
    result = assistant.answer(args.question, top_k=args.top_k)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return 0
    print(result["answer"])
    print("\nSources:")
    for i, s in enumerate(result["sources"], start=1):
        where = f" ({s['location']})" if s.get("location") else ""
        print(f"  [{i}] {s['source']}{where}  score={s['score']:.3f}  chunk={s['chunk_id']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from builder.eval_report import format_report, read_unanswerable, run_eval

    try:
        unanswerable = read_unanswerable(args.unanswerable) if args.unanswerable else []
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = run_eval(args.bundle, args.questions, answers=not args.no_answers, limit=args.limit,
                      unanswerable=unanswerable)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if args.report:
        from builder.eval_report import load_eval_questions
        from builder.report_card import write_report
        from core.bundle import Bundle

        bundle = Bundle.load(args.bundle)
        path = write_report(bundle, Path(args.report), load_eval_questions(bundle, args.questions), report)
        print(f"report card written to {path}", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from core.bundle import CONTENTS_KEY, MANIFEST, check_contents, resolve_bundle

    path = resolve_bundle(args.bundle)
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    listed = manifest.get(CONTENTS_KEY) or {}
    if not listed:
        print(f"error: {path / MANIFEST} lists no contents (a bundle built before they were recorded): "
              "nothing to verify against; rebuild it to get them", file=sys.stderr)
        return 2
    problems = check_contents(path, manifest, full=True)
    for p in problems:
        print(f"bad: {p}")
    size = sum(int(v.get("size", 0)) for v in listed.values())
    print(f"{'FAILED' if problems else 'ok'}: {len(listed)} files, {size / 2**20:.1f} MiB checked against "
          f"{path / MANIFEST}" + (f"; {len(problems)} wrong" if problems else ""))
    return 1 if problems else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.launcher import serve
    from serving.settings import read_api_key

    if args.api_key_given is not None:
        print("error: there is no --api-key: a key on a command line is visible to every local user (ps). "
              "Put it in env ASSISTANT_API_KEY, or in a file given with --api-key-file FILE.", file=sys.stderr)
        return 2
    try:
        api_key = read_api_key(args.api_key_file)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return serve(args.bundle, host=args.host, port=args.port, vllm_port=args.vllm_port, api_key=api_key,
                 allow_open=args.allow_open, max_pending=args.max_pending,
                 use_vllm=not args.no_vllm, vllm_log=args.vllm_log, vllm_args=args.vllm_args,
                 ready_timeout=args.ready_timeout)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    handlers = {"build": cmd_build, "ask": cmd_ask, "eval": cmd_eval, "serve": cmd_serve, "verify": cmd_verify}
    try:
        return handlers[args.command](args)
    except (ConfigError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
