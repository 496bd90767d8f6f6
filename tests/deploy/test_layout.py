"""The shape of the code: no import cycle among product modules (imports inside functions and under
`TYPE_CHECKING` count), `deploy/`'s packages import one way, files stay small, and every path the
design doc, the READMEs or a `deploy/` docstring cites exists.

The import graph is read from the source (`ast`), not by importing, so an import a test never
reaches still counts.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"model": "moray.model", "actors": "moray.actors", "deploy": "moray.deploy"}
GENERATED = re.compile(r"_pb2(_grpc)?\.pyi?$")
MAX_LINES = 400
# deploy/'s layers, lowest first: a module may import its own layer and the ones below, never above.
LAYERS = {"moray.deploy.serve": 0, "moray.deploy.routing": 0, "moray.deploy.api": 1, "moray.deploy.app": 2,
          "moray.deploy.cli": 3, "moray.deploy.bench": 3}
DOCS = [ROOT / "docs" / "design.md", ROOT / "README.md", ROOT / "k8s" / "README.md"]
CITED_PATH = re.compile(r"(?<![\w./])((?:deploy|model|actors|tests|k8s|docs)/[\w./-]*\w)")
CITED_FILE = re.compile(r"`([\w/]+\.(?:py|proto))`")  # a bare name: beside the citing file
LINK = re.compile(r"\]\(([^)#\s]+)\)")  # a Markdown link's target, relative to the document


def product_files() -> Iterator[tuple[str, Path]]:
    """(module name, path) of every product module."""
    yield "moray", ROOT / "__init__.py"
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join([package, *parts])
            yield name.removesuffix(".__init__"), path


MODULES = dict(product_files())


def imported(module: str, path: Path) -> set[str]:
    """The product modules `module` imports anywhere in its source."""
    out = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[:len(parts) - node.level + 1], base]).strip(".")
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out |= {_owner(n) for n in names if _owner(n)}
    return out - {module}


def _owner(name: str) -> str | None:
    """The product module that `name` (a module or a name in one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


GRAPH = {m: imported(m, p) for m, p in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions() -> None:
    assert "moray.deploy.api.client" in GRAPH["moray"]  # `moray.connect` imports it lazily


def test_no_import_cycle() -> None:
    assert cycles(GRAPH) == []


def layer(module: str) -> int | None:
    return next((n for prefix, n in LAYERS.items() if module == prefix or module.startswith(prefix + ".")),
                None)


def test_deploy_imports_point_one_way() -> None:
    upward = [(m, dep) for m, deps in GRAPH.items() if layer(m) is not None for dep in deps
              if layer(dep) is not None and layer(dep) > layer(m)]  # type: ignore[operator]
    assert upward == []


def test_model_imports_neither_ray_nor_the_rest() -> None:
    for module, path in MODULES.items():
        if module.startswith("moray.model"):
            assert not any(d.startswith(("moray.actors", "moray.deploy")) for d in GRAPH[module]), module
            assert not re.search(r"^\s*(import ray|from ray\b)", path.read_text(), re.M), module


@pytest.mark.parametrize("path", [p for m, p in MODULES.items() if m.startswith("moray.deploy")
                                  and not GENERATED.search(p.name)], ids=lambda p: str(p.relative_to(ROOT)))
def test_files_stay_small(path: Path) -> None:
    assert len(path.read_text().splitlines()) < MAX_LINES


def cited(text: str, here: Path) -> set[str]:
    """Paths a text cites that do not exist (relative to the repo, or to `here` for bare file names)."""
    missing = {p for p in CITED_PATH.findall(text) if not (ROOT / p.rstrip(".")).exists()}
    missing |= {f for f in CITED_FILE.findall(text) if "/" not in f
                and not (here / f).exists() and not (ROOT / f).exists()}
    missing |= {t for t in LINK.findall(text) if "://" not in t and not (here / t).exists()}
    return missing


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_cite_paths_that_exist(doc: Path) -> None:
    assert cited(doc.read_text(), doc.parent) == set()


def docstrings(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text:
                yield text


def test_deploy_docstrings_cite_paths_that_exist() -> None:
    bad = {}
    for module, path in MODULES.items():
        if module.startswith("moray.deploy") and not GENERATED.search(path.name):
            missing = set().union(*(cited(d, path.parent) for d in docstrings(path)))
            if any("DESIGN.md" in d for d in docstrings(path)):
                missing.add("DESIGN.md (not in this repo: cite docs/design.md)")
            if missing:
                bad[str(path.relative_to(ROOT))] = sorted(missing)
    assert bad == {}
