"""Every module imports on its own, and the package has no import cycle, not even a hidden one."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import ltclip

PACKAGE = Path(ltclip.__file__).resolve().parent
# ``python -m ltclip``'s entry point runs the CLI when imported: it is a script, not a module.
SCRIPTS = {"ltclip.__main__"}
MODULES = ["ltclip"] + sorted(
    m.name for m in pkgutil.walk_packages(ltclip.__path__, "ltclip.") if m.name not in SCRIPTS
)


# Each module is imported with no module of ltclip loaded (third-party ones stay loaded: re-importing
# torch for each of ~100 modules took minutes), so a module that works only after another was imported
# first fails here.
IMPORT_EACH_ALONE = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "ltclip" or m.startswith("ltclip.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print("\\n".join(failed))
"""


@pytest.mark.slow  # one interpreter importing torch: ~3 s
def test_every_module_imports_with_no_other_module_of_the_package_loaded():
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *MODULES], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1:]
    assert result.stdout.strip() == ""


def test_importing_each_module_alone_catches_an_order_dependence(tmp_path):
    pkg = tmp_path / "ltclip"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import ltclip.b\nVALUE = ltclip.b.helper()\n")
    (pkg / "b.py").write_text("import ltclip.a\ndef helper():\n    return 1\n")  # a cycle: fine one way round only
    code = ["import sys; sys.path.insert(0, %r)" % str(tmp_path) + "\n" + IMPORT_EACH_ALONE]
    result = subprocess.run([sys.executable, "-c", *code, "ltclip.b", "ltclip.a"], capture_output=True, text=True)
    assert result.stdout.strip().startswith("ltclip.b: AttributeError"), result.stdout


def test_every_module_is_found():
    assert {"ltclip.data.base", "ltclip.data.registry", "ltclip.data.templates", "ltclip.cli"} <= set(MODULES)


# ---------------------------------------------------------------- the import graph, read statically


def _module_files(package: Path) -> dict[str, Path]:
    files = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``module`` imports, anywhere in its code (module level or inside a
    function: a lazy import hides a cycle from the interpreter, not from this graph), except under
    ``if TYPE_CHECKING:``. ``from .x import y`` counts as importing ``.x.y`` when that is a module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"))]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
                elif target in known:
                    found.add(target)
    return found - {module}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    files = _module_files(package)
    return {module: _imports(module, path, set(files)) for module, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_reads_relative_absolute_and_lazy_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "",
        "errors.py": "import os\n",
        "sub/__init__.py": "",
        "sub/a.py": "from ..errors import E\nfrom . import b\n",
        "sub/b.py": "import pkg.errors\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n",
        "sub/c.py": "def f():\n    from .a import g\n",
        "sub/d.py": "from pkg.sub.c import f\n",
    }
    for name, text in sources.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["pkg.sub.a"] == {"pkg.errors", "pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.errors"}  # a type-only import is no import
    assert graph["pkg.sub.c"] == {"pkg.sub.a"}  # inside a function
    assert graph["pkg.sub.d"] == {"pkg.sub.c"}
    assert cycles(graph) == []
    (pkg / "errors.py").write_text("def hint():\n    from .sub.d import f\n")  # a lazy import closing a loop
    assert cycles(import_graph(pkg)) == [["pkg.errors", "pkg.sub.a", "pkg.sub.b", "pkg.sub.c", "pkg.sub.d"]]


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


# The package's folders, lowest first (docs/architecture.md draws them), and the Python API (ltclip.api) above the stages.
LAYERS = ["core", "config", "data", "models", "evaluation", "engine", "methods", "artifacts", "recipes", "stages", "sweep", "api",
          "cli"]


def test_each_folder_imports_only_folders_below_it():
    def layer(module: str) -> int | None:
        parts = module.split(".")
        return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None

    graph = import_graph()
    assert {m.split(".")[1] for m in graph if m.count(".")} - {"__main__"} == set(LAYERS)  # every folder has its place
    upward = sorted(f"{a} -> {b}" for a, imported in graph.items() for b in imported
                    if layer(a) is not None and layer(b) is not None and layer(b) > layer(a))
    assert upward == []
