"""The layering of docs/architecture.md, read from the source: no import cycles, imports point down.

Every ``import`` counts, the ones inside functions too (a lazy import hides a cycle, it does not
remove it); only ``if TYPE_CHECKING:`` blocks are skipped. A module importing a submodule of its
own package (``from pkg import sub``) depends on that submodule, not on the package's ``__init__``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("softcam_core", "annotations", "db", "service", "pages")
# the layers bottom-up: annotations (geometry, formats) < softcam_core (the library) < db < service
# (the app logic) < pages / app.py (layout). Layer -> what it must never import.
FORBIDDEN = {
    "annotations": {"softcam_core", "db", "service", "pages", "app", "streamlit"},
    "softcam_core": {"db", "service", "pages", "app", "streamlit"},
    "db": {"service", "pages", "app", "streamlit"},
    "service": {"pages", "app", "streamlit"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    found["app"] = ROOT / "app.py"
    return found


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute dotted names a module imports; ``from a import b`` gives ``a.b`` (a submodule or a name in ``a``)."""
    names: list[str] = []
    package = module if is_package else module.rpartition(".")[0]
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names += [f"{base}.{alias.name}" for alias in node.names]
        stack.extend(ast.iter_child_nodes(node))
    return names


def import_graph() -> dict[str, set[str]]:
    """First-party module -> the first-party modules and top-level third-party packages it imports.

    A name resolves to the longest first-party module it starts with (``softcam_core.explain.explain``
    -> the package ``softcam_core.explain``), else to its top-level package (third party)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges: set[str] = set()
        for name in _imported_names(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py"):
            target = name
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target != module:
                edges.add(target)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_first_party_code_has_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_point_down_the_layers(layer):
    graph = import_graph()
    wrong = sorted(f"{module} imports {target}" for module, targets in graph.items()
                   if module.split(".")[0] == layer for target in targets
                   if target.split(".")[0] in FORBIDDEN[layer])
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_cycle_and_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    lazy = ast.parse("def f():\n    from softcam_core import plots\n")
    assert "softcam_core.plots" in _imported_names(lazy, "softcam_core.evaluate", False)
    typed = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from db import schema\n")
    assert not any(n.startswith("db") for n in _imported_names(typed, "softcam_core.x", False))
    relative = ast.parse("from .loader import x\nfrom . import dicom\n")
    assert {"softcam_core.imaging.loader.x", "softcam_core.imaging.dicom"} <= set(
        _imported_names(relative, "softcam_core.imaging.deid", False))


def test_importing_every_module_below_the_pages_loads_no_streamlit():
    """The AST check's runtime twin: import all of softcam_core, annotations, db and service."""
    names = sorted(m for m in _modules() if m.split(".")[0] in FORBIDDEN and not m.endswith("__main__"))
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('streamlit', 'pages'))\n"
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_third_party_import_is_a_declared_dependency():
    """pyproject.toml's [project] dependencies name the distribution of every package the code imports."""
    import re
    import tomllib
    from importlib.metadata import packages_distributions

    declared = {re.split(r"[<>=!\[ ;]", dep, maxsplit=1)[0].lower().replace("_", "-")
                for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    first_party = {m.split(".")[0] for m in _modules()}
    imported = {target.split(".")[0] for targets in import_graph().values() for target in targets}
    third_party = sorted(p for p in imported - first_party if p not in sys.stdlib_module_names and p != "__future__")
    distributions = packages_distributions()
    missing = [f"{package} ({', '.join(distributions.get(package, ['no distribution']))})" for package in third_party
               if not {d.lower().replace("_", "-") for d in distributions.get(package, [])} & declared]
    assert not missing, f"imported but not declared in pyproject.toml: {', '.join(missing)}"
