"""The house rules of the code base, checked on its import graph (read from the source, so
nothing is imported): each wing's layers only import downwards, nothing imports in a circle,
the services hold no HTTP, and no module outgrows what a reader takes in at once."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 420  # "about 400": a module a reader takes in at once
HTTP = ("fastapi", "starlette", "sse_starlette", "uvicorn")

#: Each wing's floors, lowest first: a module may import its own floor and those below.
FLOORS = {
    "gateway": [
        ("gateway.core",),
        ("gateway.services",),
        ("gateway.api",),
        ("gateway.app", "gateway.cli"),
        ("gateway.__main__",),
    ],
    "worker": [
        ("worker.settings", "worker.torch_env", "worker.weights"),
        ("worker.engines",),
        ("worker.runtime", "worker.setup"),
        ("worker.__main__", "worker.healthcheck"),
    ],
}


def _modules(package: str) -> dict[str, Path]:
    base = ROOT / package
    out: dict[str, Path] = {}
    for path in base.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path) -> Iterator[str]:
    """Every module name ``path`` imports, TYPE_CHECKING blocks included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def _graph(package: str) -> dict[str, set[str]]:
    mods = _modules(package)
    return {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}


def _floor(module: str) -> int:
    for n, prefixes in enumerate(FLOORS[module.split(".")[0]]):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return n
    return -1  # the package itself (its __init__.py)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return [*path, m, d]
            if d not in state and (found := visit(d, [*path, m])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [])):
            return found
    return None


@pytest.mark.parametrize("package", ["gateway", "worker", "shared"])
def test_no_import_cycles(package: str) -> None:
    assert _cycle(_graph(package)) is None


@pytest.mark.parametrize("wing", sorted(FLOORS))
def test_each_wing_only_imports_downwards(wing: str) -> None:
    graph = _graph(wing)
    upward = [
        f"{m} (floor {_floor(m)}) imports {d} (floor {_floor(d)})"
        for m, deps in graph.items()
        for d in deps
        if _floor(d) > _floor(m)
    ]
    assert not upward, "\n".join(upward)
    outside = [m for m in graph if m != wing and _floor(m) < 0]
    assert not outside, f"modules on no floor: {outside}"


def test_the_gateway_core_and_services_hold_no_http() -> None:
    offenders = [
        f"{m} imports {i}"
        for m, p in _modules("gateway").items()
        if _floor(m) <= 1
        for i in _imports(p)
        if i.split(".")[0] in HTTP
    ]
    assert not offenders, "\n".join(offenders)


def test_the_wings_never_import_each_other() -> None:
    for wing, other in (("gateway", "worker"), ("worker", "gateway"), ("shared", "gateway")):
        found = [
            f"{m} imports {i}"
            for m, p in _modules(wing).items()
            for i in _imports(p)
            if i.split(".")[0] == other
        ]
        assert not found, "\n".join(found)


@pytest.mark.parametrize("package", ["gateway", "worker", "shared", "devstack"])
def test_no_module_outgrows_a_reading(package: str) -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules(package).values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
