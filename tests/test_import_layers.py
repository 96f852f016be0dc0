"""expmae's imports run one way: every import (top level or inside a function) of every module under expmae/ goes
to its own layer or a lower one of expmae.architecture.LAYERS, never into a CLI module, never in a circle."""
from __future__ import annotations

import ast
from pathlib import Path

from expmae.architecture import ALLOWED_UPWARD, LAYERS, is_cli, layer_of

PACKAGE = Path(__file__).resolve().parents[1] / "expmae"
# Files other work owns at the time of writing; the lead folds them in (each entry: importer, imported).
PENDING: set[tuple[str, str]] = set()  # known upward imports still to fix (none)


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The expmae modules ``path`` imports, anywhere in the file ('from pkg import mod' names the module)."""
    def owner(name: str) -> str:
        while name not in known:
            name = name.rpartition(".")[0]
        return name

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (expmae uses absolute ones)"
            if (node.module or "").split(".")[0] == "expmae":
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else owner(node.module)
                          for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "expmae"}
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def test_no_import_goes_up_a_layer_or_into_a_cli():
    bad = []
    for m, targets in graph().items():
        for t in targets:
            if (m, t) in ALLOWED_UPWARD or (m, t) in PENDING:
                continue
            own_cli = m.endswith(".__main__") and t == m.replace(".__main__", ".cli")
            if layer_of(t) > layer_of(m) or (is_cli(t) and not own_cli):
                bad.append(f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_circle():
    g, state, cycles = graph(), {}, []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for t in sorted(g[m]):
            if (m, t) in ALLOWED_UPWARD:
                continue
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [m, t]) if t in stack else f"{m} -> {t}")
            elif t not in state:
                visit(t, stack + [m])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [])
    assert not cycles, "\n".join(cycles)


def test_pending_entries_are_still_needed():
    g = graph()
    assert all(t in g[m] for m, t in PENDING), "an entry of PENDING is fixed: remove it"
