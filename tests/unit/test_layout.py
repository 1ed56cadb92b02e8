"""The layout's import rules, read from the source (ast), not from a paragraph.

- No import cycle between two modules of ``toolkit``, nor between two of its top-level packages or
  modules (``toolkit.repository``, ``toolkit.client``, ...). Every import counts, also one inside a
  function or under ``TYPE_CHECKING``: a lazy import hides a cycle, it does not remove it.
- The stub side (``toolkit.runtime.STUB_SIDE``: what Triton's python stub imports, and what
  ``toolkit package`` copies into the image) imports nothing of ``toolkit`` outside itself, and
  ``toolkit/runtime/`` imports nothing of ``toolkit`` but ``toolkit.runtime``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from toolkit.runtime import STUB_SIDE

PACKAGE = Path(__file__).resolve().parents[2] / "toolkit"

#: Cycles left on purpose, each with the work that removes it.
KNOWN_CYCLES: set[frozenset[str]] = set()  # the supervisor reaches its server through a Protocol


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


MODULES = all_modules()


def resolve(name: str) -> str | None:
    """The module of ``toolkit`` that ``name`` (a module, or a name inside one) lives in."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imported_names(module: str) -> list[tuple[str, bool, bool]]:
    """What ``module`` imports, anywhere in its file: (dotted name, whether it must be a module,
    whether it is an edge of the import graph)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool, bool]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, True, True) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule pkg.sub, `from mod import name` the module mod
            # (that pkg's __init__ runs first is not an edge: it would make every package a cycle)
            found += [(base, True, False)] + [(f"{base}.{alias.name}", False, True) for alias in node.names]
    return found


def imports(module: str) -> set[str]:
    """Every module of ``toolkit`` that ``module`` imports."""
    targets = {resolve(name) for name, _, edge in imported_names(module) if edge and name.split(".")[0] == "toolkit"}
    return {t for t in targets if t and t != module}


GRAPH = {module: imports(module) for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def top_level(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_import_reader_sees_lazy_relative_and_submodule_imports():
    assert "toolkit.client.failures" in GRAPH["toolkit.client.retry"]          # from toolkit.client.failures import
    assert "toolkit.repository" in GRAPH["toolkit.cli.repo"]                   # inside the command function
    assert "toolkit.bench.peer_envs" in GRAPH["toolkit.bench.peers"]
    assert "toolkit.runtime.fused_runner" in GRAPH["toolkit.runtime.adapter"]         # lazy, in initialize()


def test_every_import_of_toolkit_names_a_module_that_exists():
    missing = sorted(f"{module}: {name}" for module in MODULES for name, is_module, _ in imported_names(module)
                     if name.split(".")[0] == "toolkit" and is_module and name not in MODULES)
    assert not missing, f"imports of modules that do not exist (moved?): {missing}"


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_two_modules_import_each_other():
    found = [c for c in cycles(GRAPH) if frozenset(c) not in KNOWN_CYCLES]
    assert not found, f"import cycles between modules: {[sorted(c) for c in found]}"


def test_no_two_top_level_packages_import_each_other():
    graph: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        graph.setdefault(top_level(module), set()).update(
            top_level(t) for t in targets if top_level(t) != top_level(module))
    found = [c for c in cycles(graph) if frozenset(c) not in KNOWN_CYCLES]
    assert not found, f"import cycles between top-level packages: {[sorted(c) for c in found]}"


def stub_side(module: str) -> bool:
    return any(module == f"toolkit.{Path(entry).stem}" or module.startswith(f"toolkit.{entry}.")
               for entry in STUB_SIDE)


def test_stub_side_lists_what_exists():
    for entry in STUB_SIDE:
        assert (PACKAGE / entry).exists(), entry
    assert stub_side("toolkit.hooks") and stub_side("toolkit.runtime") and stub_side("toolkit.builtins.text")
    assert not stub_side("toolkit.repository.render") and not stub_side("toolkit.client")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if stub_side(m)))
def test_stub_side_imports_nothing_of_toolkit_outside_it(module):
    outside = sorted(t for t in GRAPH[module] if not stub_side(t))
    assert not outside, f"{module} runs in Triton's python stub but imports {outside}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("toolkit.runtime")))
def test_runtime_imports_only_runtime(module):
    outside = sorted(t for t in GRAPH[module] if not (t == "toolkit.runtime" or t.startswith("toolkit.runtime.")))
    assert not outside, f"{module} imports {outside}: toolkit.runtime imports nothing else of toolkit"


def in_cli(module: str) -> bool:
    return module == "toolkit.cli" or module.startswith("toolkit.cli.")


def test_nothing_imports_the_cli():
    users = sorted(m for m, targets in GRAPH.items() if not in_cli(m) and any(in_cli(t) for t in targets))
    assert not users, f"{users} import the CLI"


def test_every_package_says_its_job_and_what_it_may_import():
    # export/ and lifecycle/ are being rewritten on main; their docstrings follow with that work.
    skip = {"toolkit.export", "toolkit.lifecycle"}
    for module, path in MODULES.items():
        if path.name != "__init__.py" or module in skip or module == "toolkit.bench.servers":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        assert "import" in doc.lower(), f"{module}'s docstring does not say what it may import"
