"""The import graph of tunelab: no cycle between modules, and no import from a lower package
into a higher one. Every import counts, at the top of a module or inside a function."""

import ast
from pathlib import Path

import tunelab

SRC = Path(tunelab.__file__).parent

# A package imports only from packages ranked below it. Packages of one rank may not import
# each other (train and infer stand side by side), except at the bottom, where the cycle
# test alone keeps the leaves apart.
RANK = {
    "config": 0,
    "errors": 0,
    "files": 0,
    "textfile": 0,
    "network": 0,
    "redact": 0,
    "access": 0,
    "rundir": 0,
    "data": 1,
    "model": 2,
    "train": 3,
    "infer": 3,
    "jobs": 4,
    "server": 5,
    "cli": 6,
    "__main__": 7,
}


def _name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``source`` (the text of ``module``) imports anywhere."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: None if is_package else -1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            for alias in node.names:  # `from tunelab.x import y`: y may be a module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m not in (module, "tunelab")}


def _graph() -> dict[str, set[str]]:
    files = {_name(p): p for p in SRC.rglob("*.py")}
    known = set(files)
    return {
        name: _imports(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known)
        for name, path in files.items()
        if name != "tunelab"
    }


def _package(module: str) -> str:
    return module.split(".")[1]


def _against_layers(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in graph.items():
        for target in targets:
            src, dst = _package(module), _package(target)
            if src != dst and (RANK[dst] > RANK[src] or (RANK[dst] == RANK[src] > 0)):
                wrong.append(f"{module} -> {target}")
    return sorted(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_every_package_has_a_rank():
    packages = {_package(m) for m in _graph()}
    assert packages <= set(RANK), f"give these a rank in RANK: {sorted(packages - set(RANK))}"


def test_no_import_goes_upward_or_sideways():
    wrong = _against_layers(_graph())
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_walk_sees_lazy_and_relative_imports_and_flags_them():
    known = {"tunelab.train.run", "tunelab.infer.hub", "tunelab.data.a", "tunelab.data.b"}
    source = "def push():\n    from tunelab.infer import hub\n"
    assert _imports(source, "tunelab.train.run", False, known) == {"tunelab.infer.hub"}
    assert _imports("from . import b\n", "tunelab.data.a", False, known) == {"tunelab.data.b"}
    graph = {
        "tunelab.train.run": {"tunelab.infer.hub"},  # sideways
        "tunelab.data.a": {"tunelab.data.b", "tunelab.train.run"},  # upward
        "tunelab.data.b": {"tunelab.data.a"},  # a cycle
    }
    assert _against_layers(graph) == ["tunelab.data.a -> tunelab.train.run",
                                      "tunelab.train.run -> tunelab.infer.hub"]  # fmt: skip
    assert _cycles(graph) == [["tunelab.data.a", "tunelab.data.b", "tunelab.data.a"]]
