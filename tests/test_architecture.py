"""The import rule of docs/architecture.md: each room imports only the rooms listed for it.

Every import statement counts, also those inside functions: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "data_pipelines", "orchestration", "tuning")

_BASE = {"models", "data_pipelines", "orchestration.config", "orchestration.stages"}
_TOP = {"orchestration"}  # the composing modules may import every room of orchestration
# room -> the packages of ours it may import (itself always allowed)
ALLOWED: dict[str, set[str]] = {
    "models": set(),
    "data_pipelines": {"models"},  # the text tokenizer of the CLIP it feeds
    "orchestration.stages": set(),
    "orchestration.config": {"orchestration.stages", "data_pipelines"},
    "orchestration.common": _BASE,
    "orchestration.registry": _BASE | {"orchestration.common"},
    "orchestration.train": _BASE | {"orchestration.common", "orchestration.registry"},
    "orchestration.evaluate": _BASE
    | {"orchestration.common", "orchestration.registry", "orchestration.train"},
    "orchestration.serve": _BASE | {"orchestration.common", "orchestration.registry"},
    "orchestration.jobs": {"orchestration.config", "orchestration.common"},
    "orchestration": _BASE | _TOP,
    "tuning": _BASE | _TOP,
}
# outside packages a room must never load: serving and the registry carry no training stack
FORBIDDEN_EXTERNAL: dict[str, tuple[str, ...]] = {
    "orchestration.registry": ("ray.train", "ray.tune", "deepspeed"),
    "orchestration.serve": ("ray.train", "ray.tune", "deepspeed"),
    "orchestration.jobs": ("torch", "deepspeed", "ray.train"),
}
NEVER_IN_PRODUCT = ("unittest", "pytest")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from orchestration import registry` names a module: count it as one
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _room(module: str, rooms) -> str:
    return max((r for r in rooms if module == r or module.startswith(r + ".")), key=len)


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = _module_name(path)
            room = _room(module, ALLOWED)
            allowed = ALLOWED[room] | {room}
            for line, name in _imports(path):
                where = f"{path.relative_to(ROOT)}:{line} imports {name}"
                if _within(name, PACKAGES):
                    target = _room(name, ALLOWED) if _within(name, ALLOWED) else name
                    if not _within(target, allowed):
                        found.append(f"{where} ({room} may import {sorted(allowed)})")
                elif _within(name, FORBIDDEN_EXTERNAL.get(room, ())):
                    found.append(f"{where} ({room} must not load it)")
                elif _within(name, NEVER_IN_PRODUCT):
                    found.append(f"{where} (test machinery in product code)")
    return found


def test_every_import_follows_the_room_rule():
    assert _violations() == []


def test_the_rule_catches_a_forbidden_arrow(tmp_path, monkeypatch):
    """The checker itself can fail: a serving module that imports training is reported."""
    bad = ROOT / "orchestration" / "serve" / "_arrow_probe.py"
    bad.write_text("from orchestration.train.train_loop import WorkerSpec\nimport unittest\n")
    try:
        found = _violations()
    finally:
        bad.unlink()
    assert [v.split(" (")[0] for v in found] == [
        "orchestration/serve/_arrow_probe.py:1 imports orchestration.train.train_loop.WorkerSpec",
        "orchestration/serve/_arrow_probe.py:2 imports unittest",
    ]


@pytest.mark.parametrize("room", sorted(r for r in ALLOWED if r.count(".") == 1
                                        and (ROOT / r.replace(".", "/")).is_dir()))
def test_every_room_says_what_it_owns(room):
    init = ROOT / room.replace(".", "/") / "__init__.py"
    assert init.exists(), f"{room} has no __init__.py"
    assert ast.get_docstring(ast.parse(init.read_text())), f"{room}/__init__.py has no docstring"


def _module_graph() -> dict[str, set[str]]:
    """Our modules -> the modules of ours they import (a name imported from a module counts
    as that module)."""
    paths = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        targets = set()
        for _, name in _imports(path):
            while name and name not in paths:
                name = name.rpartition(".")[0]
            if name and name != module and not paths[name].name == "__init__.py":
                targets.add(name)
        graph[module] = targets
    return graph


def test_no_import_cycles():
    """Modules import each other in one direction only (lazy imports included)."""
    graph, cycles, state = _module_graph(), [], {}

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_product_functions_are_short():
    """No function of the product is over 50 lines: past that it does more than one thing."""
    long = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    if length > 50:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {length}")
    assert long == []
