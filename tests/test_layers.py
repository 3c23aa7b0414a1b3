"""The layers point down, and no module imports itself back: read from the source with ``ast``.

``services/`` may use ``models/`` and ``common/``; ``models/`` uses only ``common``'s audio and
file helpers (no bus, no wire protocol, no pipeline config); ``common/`` knows nothing of ours;
``scripts/`` import nothing from ``tests/``. Imports inside functions count too: a deferred import
is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "models", "services")
#: What ``models`` may import from ``common``.
MODELS_MAY_USE = {"common.audio", "common.files"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # "from pkg import module"
    return out


def ours(names: set[str], modules: set[str]) -> set[str]:
    return {n for n in names if n in modules}


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def test_layers_point_down():
    modules = source_modules()
    bad = []
    for name, path in modules.items():
        deps = ours(imports_of(path), set(modules))
        layer = name.split(".")[0]
        for dep in deps:
            dep_layer = dep.split(".")[0]
            if layer == "common" and dep_layer != "common":
                bad.append(f"{name} -> {dep}: common/ knows nothing of ours")
            if layer == "models" and (dep_layer == "services" or (dep_layer == "common" and dep not in MODELS_MAY_USE)):
                bad.append(f"{name} -> {dep}: models/ use only common's audio and file helpers")
    assert not bad, "\n".join(sorted(bad))


def test_scripts_import_nothing_from_tests():
    tests = {p.stem for p in (REPO / "tests").glob("*.py")}
    bad = [f"{p.name} -> {n}" for p in (REPO / "scripts").glob("*.py") for n in imports_of(p)
           if n.split(".")[0] in tests or n.startswith("tests")]
    assert not bad, bad


def test_no_import_cycles():
    modules = source_modules()
    graph = {name: ours(imports_of(path), set(modules)) - {name} for name, path in modules.items()}
    # A package's __init__ imported by its own submodules is how Python loads them, not a cycle.
    for name, deps in graph.items():
        deps -= {name.rsplit(".", 1)[0]} if "." in name else set()
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)
