"""The layering contract: the shared core imports nothing else of the project, serving and the builder import
only the core (and themselves), only the command line imports both, and no import cycle exists between modules
or between packages. Imports inside functions count as much as those at the top of a file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "builder", "serving", "assistant")
# What each package may import of the project, besides the standard library and third-party packages.
ALLOWED = {"core": {"core"}, "builder": {"core", "builder"}, "serving": {"core", "serving"},
           "assistant": {"core", "builder", "serving", "assistant"}}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the project modules it imports}, read from the source of every module of PACKAGES under root.
    ``from pkg import name`` points at pkg.name when that is a module, else at pkg."""
    files = {module_name(root, p): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against this module's package
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:  # "core.retrieval.Retriever" -> "core.retrieval"
                    t = t.rpartition(".")[0]
                if t and t.split(".")[0] in PACKAGES and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets
                  if t.split(".")[0] not in ALLOWED[m.split(".")[0]])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m, targets in graph.items():
        out.setdefault(m.split(".")[0], set()).update(t.split(".")[0] for t in targets if t.split(".")[0] !=
                                                      m.split(".")[0])
    return out


def test_each_package_imports_only_what_its_layer_allows():
    graph = import_graph(REPO)
    assert {m.split(".")[0] for m in graph} == set(PACKAGES)
    assert layering_violations(graph) == []


def test_no_import_cycle_between_modules_or_packages():
    graph = import_graph(REPO)
    assert find_cycle(graph) is None
    assert find_cycle(package_graph(graph)) is None


def test_only_the_command_line_imports_both_the_builder_and_the_server():
    graph = import_graph(REPO)
    both = {m for m, targets in graph.items()
            if {t.split(".")[0] for t in targets} >= {"builder", "serving"}}
    assert both <= {m for m in graph if m.startswith("assistant")}


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for pkg in PACKAGES:
        (root / pkg).mkdir(exist_ok=True)
        (root / pkg / "__init__.py").touch()
    return root


@pytest.mark.parametrize("module, line, expected", [
    ("serving/api.py", "from builder.config import X", "serving.api imports builder.config"),
    ("serving/api.py", "def f():\n    import builder.pipeline\n", "serving.api imports builder.pipeline"),
    ("core/bundle.py", "from serving import api", "core.bundle imports serving.api"),
    ("builder/llm.py", "from serving.api import app", "builder.llm imports serving.api"),
])
def test_the_contract_catches_a_back_import_even_inside_a_function(tmp_path, module, line, expected):
    root = _tree(tmp_path, {"core/config.py": "", "core/bundle.py": "", "builder/config.py": "",
                            "builder/pipeline.py": "", "builder/llm.py": "", "serving/api.py": ""})
    (root / module).write_text(line + "\n")
    assert layering_violations(import_graph(root)) == [expected]


def test_the_contract_catches_a_cycle(tmp_path):
    root = _tree(tmp_path, {"serving/settings.py": "from serving.vllm_server import plan\n",
                            "serving/vllm_server.py": "def main():\n    from serving import settings\n"})
    graph = import_graph(root)
    assert layering_violations(graph) == []
    assert find_cycle(graph) in (["serving.settings", "serving.vllm_server", "serving.settings"],
                                 ["serving.vllm_server", "serving.settings", "serving.vllm_server"])
