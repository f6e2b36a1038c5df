"""The Gradio chat UI, mounted on the gateway at "/". It calls the RAG service in-process, never a model.

    .venv/bin/assistant serve bundles/latest     # then open http://127.0.0.1:7860/

Answers stream in; the passages behind each answer are listed under it in the conversation and shown in
full beside it (file, page or heading, score, text). When the model server is down the answer bubble and a
banner say so, and the spinner stops.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from core.bundle import REPORT_FILE
from serving.protocol import Source
from serving.rag_service import GatewayError, RagService, bundle_summary

CSS = """
#header h1 { margin: 0 0 .2em 0; font-size: 1.5em; }
#header .facts { display: flex; flex-wrap: wrap; gap: .4em; margin: .3em 0; }
#header .fact { border: 1px solid var(--border-color-primary); border-radius: 6px; padding: .1em .5em;
                font-size: .85em; }
#header .fact b { font-weight: 600; }
#sources .source { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: .5em .7em;
                   margin-bottom: .6em; }
#sources .source.cited { border-color: var(--color-accent); border-width: 2px; }
#sources .where { font-size: .9em; margin-bottom: .3em; }
#sources .score { color: var(--body-text-color-subdued); font-size: .85em; }
#sources .passage { white-space: pre-wrap; font-size: .85em; max-height: 14em; overflow-y: auto;
                    border-left: 3px solid var(--border-color-primary); padding-left: .6em; margin: 0; }
#sources .query { color: var(--body-text-color-subdued); font-size: .85em; }
#status .error { background: #fde8e8; color: #8a1c1c; border: 1px solid #f5b5b5; border-radius: 8px;
                 padding: .6em .8em; font-weight: 500; }
"""

SOURCES_PLACEHOLDER = ('<div class="sources-empty">Ask a question: the passages the answer is based on '
                       'appear here, with the file and section they come from.</div>')


def header_html(service: RagService, model: str) -> str:
    a = service.get(model)
    facts = [("model", a.name), ("weights", a.served.weights)] + bundle_summary(a.bundle)
    pills = "".join(f'<span class="fact"><b>{html.escape(k)}</b> {html.escape(v)}</span>' for k, v in facts)
    return (f'<div id="header-inner"><h1>{html.escape(service.settings.title)}</h1>'
            f'<div class="facts">{pills}</div></div>')


def where(s: Source) -> str:
    return f"{s.source} — {s.location}" if s.location else s.source


def sources_html(sources: list[Source], query: str = "", retrieval_ms: float | None = None) -> str:
    if not sources:
        return '<div class="sources-empty">No passage was found for this question.</div>'
    parts = ['<div class="sources-list"><h3>Sources of the last answer</h3>']
    if query:
        timing = f" ({retrieval_ms:.0f} ms)" if retrieval_ms is not None else ""
        parts.append(f'<p class="query">Searched for: “{html.escape(query)}”{timing}</p>')
    for s in sources:
        cls = "source cited" if s.cited else "source"
        mark = " · cited" if s.cited else ""
        parts.append(
            f'<div class="{cls}" data-source="{html.escape(s.source)}">'
            f'<div class="where"><b>[{s.rank}] {html.escape(s.source)}</b>'
            f'{" — " + html.escape(s.location) if s.location else ""} '
            f'<span class="score">score {s.score:.3f}{mark}</span></div>'
            f'<blockquote class="passage">{html.escape(s.text)}</blockquote></div>')
    parts.append("</div>")
    return "".join(parts)


def sources_message(sources: list[Source], abstained: bool = False) -> dict:
    """A collapsible note under the answer in the conversation, listing where its passages come from; where the
    assistant abstained, the passages it found and judged too weak to answer from."""
    files = list(dict.fromkeys(s.source for s in sources))
    lines = [f"[{s.rank}] {where(s)}{' (cited)' if s.cited else ''}" for s in sources]
    label = "Closest passages, none of which answers" if abstained else "Sources"
    return {"role": "assistant", "content": "\n".join(f"- {line}" for line in lines) or "no passages",
            "metadata": {"title": f"{label}: {', '.join(files)}" if files else f"{label}: none", "status": "done"}}


def error_html(message: str) -> str:
    return f'<div class="error" role="alert">⚠️ {html.escape(message)}</div>'


def chat_handler(service: RagService):
    """The UI's event handler: (question, chat, history, model) -> stream of
    (question box, chat, history, sources panel, status banner)."""

    async def respond(question: str, chat: list[dict], history: list[dict], model: str):
        question = (question or "").strip()
        if not question:
            yield gr.update(), chat, history, gr.update(), ""
            return
        chat = list(chat or []) + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        pending = '<div class="sources-empty">Searching the knowledge base…</div>'
        yield "", chat, history, pending, ""
        answer = ""
        try:
            turns = list(history or []) + [{"role": "user", "content": question}]
            async for ev in service.answer_events(model, turns):
                if ev.kind == "sources":
                    yield "", chat, history, sources_html(ev.sources, ev.query, ev.retrieval_ms), ""
                elif ev.kind == "delta":
                    answer += ev.text
                    # A new list each time: Gradio diffs successive values, so mutating one in place is lost.
                    chat = chat[:-1] + [{"role": "assistant", "content": answer}]
                    yield "", chat, history, gr.update(), ""
                elif ev.kind == "done":
                    chat = chat[:-1] + [{"role": "assistant", "content": ev.text.strip() or "(empty answer)"},
                                        sources_message(ev.sources, ev.abstained)]
                    history = turns + [{"role": "assistant", "content": ev.text}]
                    yield "", chat, history, sources_html(ev.sources, ev.query, ev.retrieval_ms), ""
        except GatewayError as exc:
            chat = chat[:-1] + [{"role": "assistant", "content": f"⚠️ {exc.message}"}]
            yield "", chat, history, gr.update(), error_html(exc.message)
        except Exception as exc:  # noqa: BLE001 - the user must see a message, not a spinner that never stops
            message = f"Unexpected error: {exc}"
            chat = chat[:-1] + [{"role": "assistant", "content": f"⚠️ {message}"}]
            yield "", chat, history, gr.update(), error_html(message)

    return respond


def report_card_html(service: RagService, model: str) -> str:
    """The bundle's report card (eval/report.html) in a frame of its own, so its styles stay its own."""
    path = service.get(model).bundle.file(REPORT_FILE)
    if not path.is_file():
        return ""
    page = html.escape(path.read_text(encoding="utf-8"), quote=True)
    return f'<iframe title="report card" srcdoc="{page}" style="width:100%;height:900px;border:0"></iframe>'


def build_ui(service: RagService) -> gr.Blocks:
    names = list(service.assistants)
    default = names[0]
    respond = chat_handler(service)

    def clear():
        return [], [], SOURCES_PLACEHOLDER, "", ""

    with gr.Blocks(title=service.settings.title, fill_width=True, analytics_enabled=False) as demo:
        header = gr.HTML(header_html(service, default), elem_id="header")
        if len(names) > 1:
            model = gr.Dropdown(names, value=default, label="Assistant", elem_id="model")
        else:
            model = gr.State(default)
        history = gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=560, buttons=["copy"],
                                     placeholder="Answers come from the knowledge base, with their sources.")
                status = gr.HTML("", elem_id="status", padding=False)
                with gr.Row():
                    box = gr.Textbox(placeholder="Ask a question about the knowledge base…", show_label=False,
                                     elem_id="question", scale=6, autofocus=True, submit_btn=False)
                    ask = gr.Button("Ask", variant="primary", elem_id="ask", scale=1)
                clear_btn = gr.Button("Clear chat", elem_id="clear", size="sm")
                examples = service.get(default).examples
                if examples:
                    gr.Examples([[q] for q in examples], inputs=[box], label="Example questions",
                                elem_id="examples")
            with gr.Column(scale=2):
                sources = gr.HTML(SOURCES_PLACEHOLDER, elem_id="sources", label="Sources")
        card = report_card_html(service, default)
        if card:
            with gr.Accordion("Report card: what the fine-tuning changed, measured on held-out questions",
                              open=False, elem_id="report-card"):
                gr.HTML(card)
        outputs: list[Any] = [box, chatbot, history, sources, status]
        inputs = [box, chatbot, history, model]
        # The UI's events are not an API (the API is /v1), and many people may ask at once: vLLM batches them.
        private = {"api_visibility": "private"}
        box.submit(respond, inputs, outputs, show_progress="minimal", concurrency_limit=None, **private)
        ask.click(respond, inputs, outputs, show_progress="minimal", concurrency_limit=None, **private)
        cleared = [chatbot, history, sources, status, box]
        clear_btn.click(clear, None, cleared, **private)
        chatbot.clear(clear, None, cleared, **private)  # the chat's own trash icon forgets the history too
        if len(names) > 1:
            model.change(lambda m: (header_html(service, m), *clear()), model, [header, *cleared], **private)
    return demo
