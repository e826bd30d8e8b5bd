"""The shape of the code: no import circle between the project's modules, docs/architecture.md names every
module, and the docs name no file that is gone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dset", "studies", "analysis")
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of the project's packages (a package is its
    ``__init__.py``)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``name`` imports anywhere in its file: at the top, inside functions, under
    ``if TYPE_CHECKING``. ``from package import x`` counts as importing ``package.x`` when that is a module,
    else ``package``."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` imports the deepest project module named
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    """The walker itself: a circle hidden behind a function-level relative import is found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    modules = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py", "pkg.c": pkg / "c.py"}
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert circles(graph) == [["pkg.a", "pkg.b"]]


def test_no_import_circle():
    found = circles(import_graph())
    assert not found, "import circles (each a set of modules that import each other): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_layers_import_downwards():
    """dset knows nothing of studies or analysis; studies nothing of analysis."""
    above = {"dset": ("studies", "analysis"), "studies": ("analysis",), "analysis": ()}
    wrong = [f"{name} -> {target}" for name, targets in import_graph().items() for target in targets
             if target.split(".")[0] in above[name.split(".")[0]]]
    assert not wrong, "imports that climb a layer: " + ", ".join(sorted(wrong))


def module_paths() -> list[str]:
    """Every module as docs/architecture.md names it: its file, or a package's folder with a slash."""
    out = []
    for path in project_modules().values():
        rel = path.relative_to(ROOT)
        out.append(f"{rel.parent.as_posix()}/" if path.name == "__init__.py" else rel.as_posix())
    return out


@pytest.fixture(scope="module")
def architecture_text() -> str:
    assert ARCHITECTURE.is_file(), f"{ARCHITECTURE} is missing"
    return ARCHITECTURE.read_text()


def test_architecture_names_every_module(architecture_text):
    named = set(re.findall(r"`([\w/.]+)`", architecture_text))
    missing = [p for p in module_paths() if p not in named]
    assert not missing, f"docs/architecture.md does not name: {', '.join(missing)}"


def test_docs_name_no_file_that_is_gone():
    """Every project path that README.md or a docs page names exists (a moved module leaves no stale pointer)."""
    gone = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        # lower-case names only: `studies/NAME.yaml` is a placeholder
        for path in set(re.findall(r"\b((?:dset|studies|analysis|tests)/[a-z0-9_/]*(?:\.py|\.yaml|\.j2|/))",
                                   page.read_text())):
            if not (ROOT / path).exists():
                gone.append(f"{page.relative_to(ROOT)}: {path}")
    assert not gone, "paths that do not exist: " + ", ".join(sorted(gone))
