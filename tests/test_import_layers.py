"""The rooms of components/ import downwards only, and no module imports itself back through another
(docs/architecture.md). Every import counts, those inside functions too: a deferred import is still an arrow."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# lowest first: a module may import its own room and the rooms before it
LAYERS = [
    ("errors", "config_base", "profiles", "mathcheck", "figures", "ray_utils", "tracking", "hashing"),
    ("model",),
    ("data",),
    ("train",),
    ("grpo",),
    ("evaluate",),
    ("pipeline",),
    ("config", "cli", "commands"),
]
RANK = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted((ROOT / "components").rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _edges(mods: dict[str, Path]) -> set[tuple[str, str]]:
    """(importer, imported module) for every components import; `from pkg import sub` names the submodule."""
    edges = set()
    for mod, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            else:
                continue
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t.startswith("components") and t in mods and t != mod:
                    edges.add((mod, t))
    return edges


def _room(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_room_has_a_layer():
    assert {_room(m) for m in _modules()} - {"components"} <= set(RANK)


def test_no_upward_import():
    up = sorted((a, b) for a, b in _edges(_modules()) if RANK.get(_room(a), 0) < RANK.get(_room(b), 0))
    assert up == []


def test_no_import_circle():
    edges = _edges(_modules())
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    circles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert circles == []
