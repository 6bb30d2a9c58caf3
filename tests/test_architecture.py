"""The layers of docs/architecture.md, checked against the code's own imports.

Read from the source with `ast` (nothing is imported), counting imports under
`TYPE_CHECKING` too: a type-only cycle is still two modules that cannot be understood, or
compiled by mypyc, one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

#: a package or module may import from its own rank or below, never above (cli highest)
RANKS: dict[str, int] = {
    "cli": 9,
    "demo": 8,
    "app": 7,
    "admin": 6,
    "control": 6,
    "report": 6,
    "replay": 6,
    # verify may use store, compare and config; only cli imports it
    "verify": 6,
    # peers' configs -> native config: uses config only; cli and app use it
    "importers": 2,
    # migration plans: read store and metrics, act through control, run verify; app wires them
    "migrate": 6,
    "proxy": 5,
    # upgrade requests beside the primary path: it uses the proxy, the proxy never it
    "upgrades": 5,
    "routing": 4,
    "shadow": 4,
    "record": 4,
    "compare": 3,
    "store": 2,
    # everything may use these
    "wire": 1,
    "config": 1,
    "metrics": 1,
    "": 1,  # shadowlane/__init__.py: version and build kind
    "__main__": 9,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            # `from shadowlane.x import y` may name a submodule y
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "shadowlane" or m.startswith("shadowlane.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.joinpath("shadowlane").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path, name):
            # the longest known module the import names (a name imported from a module is not
            # a module of its own)
            while imported not in modules and "." in imported:
                imported = imported.rpartition(".")[0]
            if imported in modules and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


#: modules that only name things (no imports of their own) and that every layer counts with:
#: the shadow outcomes are owned by shadow/ but also label metrics, which everything uses
VOCABULARY = {"shadowlane.shadow.outcomes": "metrics"}


def _layer(module: str) -> str:
    if module in VOCABULARY:
        return VOCABULARY[module]
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_vocabulary_modules_import_nothing_of_ours() -> None:
    graph = _graph()
    assert {name: graph[name] for name in VOCABULARY} == {name: set() for name in VOCABULARY}


def test_the_graph_is_read() -> None:
    graph = _graph()
    assert "shadowlane.proxy" in graph and "shadowlane.wire.server" in graph
    assert "shadowlane.routing" in graph["shadowlane.proxy"] or any(
        m.startswith("shadowlane.routing") for m in graph["shadowlane.proxy"]
    )


def test_every_layer_has_a_rank() -> None:
    assert {_layer(m) for m in _graph()} <= set(RANKS)


def test_no_import_goes_up_a_layer() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if RANKS[_layer(target)] > RANKS[_layer(module)]
    ]
    assert upward == []


def test_no_import_cycle() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def _compiled_modules() -> set[str]:
    """The modules setup.py compiles with mypyc (its COMPILED list, read as text)."""
    tree = ast.parse((SRC.parent / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets
        ):
            paths = ast.literal_eval(node.value)
            return {_module_name(SRC.parent / p) for p in paths}
    raise AssertionError("setup.py has no COMPILED list")


def test_no_interpreted_class_inherits_from_a_compiled_one() -> None:
    """mypyc refuses it at import time ("interpreted classes cannot inherit from compiled"),
    so an interpreted subclass of, say, wire.upstream.ResponseSink works in the pure-Python
    build the helpers develop with and fails only in the compiled one CI runs."""
    compiled = _compiled_modules()
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        if module in compiled:
            continue
        tree = ast.parse(path.read_text(), str(path))
        imported: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    imported[alias.asname or alias.name] = node.module
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            for base in node.bases:
                name = base.id if isinstance(base, ast.Name) else None
                if name is not None and imported.get(name) in compiled:
                    wrong.append(f"{module}.{node.name}({imported[name]}.{name})")
    assert wrong == [], "compile these modules too (setup.py COMPILED): " + ", ".join(wrong)
