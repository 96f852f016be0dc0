"""expmae's imports run one way: every import (top level or inside a function) of every module under expmae/ goes
to its own layer or a lower one of expmae.architecture.LAYERS, never into a CLI module, never in a circle.

Imports sit at the top of their file. An import inside a function or method says why it is deferred, in a comment
``# deferred: <kind>: <what it keeps out, measured>`` on its line, or above it or above its group of imports (blank
lines, comments and ``try:`` between are fine), and the kind is one of REASONS, each checked against the code:

- ``console start-up``: a console script loads this module before it parses its arguments, and the import would
  make its ``--help`` and argument/config checks pay for what only a valid run needs (torch, transformers, ...).
  Checked: the module is loaded by the ``--help`` of a console script whose ``--help`` loads no torch
  (LIGHT_HELP_SCRIPTS), and the imported module is not.
- ``optional dependency``: a third-party package that only an optional path of the module needs: an extra (such
  as ``tts``), or a heavy or noisy package that only an opt-in setting uses (DeepSpeed for a debug probe).
  Checked: a third-party package that the file does not import at its top.
- ``upward shim``: a lazy public-API name that goes up a layer on purpose. Checked: the pair is in
  expmae.architecture.ALLOWED_UPWARD.

The why names what the import would load and what that was measured to cost (``+1.5 s on expmae-features --help``);
an import that adds less than a few milliseconds to a light ``--help`` belongs at the top.

An import cycle is not a reason: a module that needs a deferred import to break a circle belongs in another layer.
"""
from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
from pathlib import Path

from test_package import console_scripts

from expmae.architecture import ALLOWED_UPWARD, LAYERS, is_cli, layer_of

PACKAGE = Path(__file__).resolve().parents[1] / "expmae"
# Files other work owns at the time of writing; the lead folds them in (each entry: importer, imported).
PENDING: set[tuple[str, str]] = set()  # known upward imports still to fix (none)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def targets(node: ast.AST, known: dict[str, Path]) -> set[str]:
    """The expmae modules an import statement imports ('from pkg import mod' names the module)."""
    def owner(name: str) -> str:
        while name not in known:
            name = name.rpartition(".")[0]
        return name

    if isinstance(node, ast.ImportFrom):
        if (node.module or "").split(".")[0] == "expmae":
            return {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else owner(node.module)
                    for a in node.names}
    elif isinstance(node, ast.Import):
        return {owner(a.name) for a in node.names if a.name.split(".")[0] == "expmae"}
    return set()


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The expmae modules ``path`` imports, anywhere in the file."""
    nodes = list(ast.walk(ast.parse(path.read_text(encoding="utf-8"))))
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in nodes), \
        f"{path}: relative import (expmae uses absolute ones)"
    return set().union(*(targets(node, known) for node in nodes))


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


# ---------------------------------------------------------------------------- imports inside functions say why
MARK = "# deferred:"
REASONS = {
    "console start-up": "a light console script's --help loads the module, and not what the import brings in",
    "optional dependency": "a third-party package only an optional path needs, not imported at the file's top",
    "upward shim": "a lazy public-API name going up a layer on purpose (expmae.architecture.ALLOWED_UPWARD)",
}
# Console scripts whose --help loads torch through their module's top-level imports: no deferral keeps it light.
HEAVY_HELP = {"expmae-export", "expmae-visualize"}
LIGHT_HELP_SCRIPTS = {**{name: target for name, target in console_scripts().items() if name not in HEAVY_HELP},
                      "python -m expmae.pretrain": "expmae.pretrain.cli:main"}


@functools.cache
def help_start_up(target: str) -> frozenset[str]:
    """Every module (sys.modules) that ``module:function --help`` loads, in a fresh interpreter."""
    module, function = target.split(":")
    code = ("import contextlib, importlib, io, sys\n"
            f"main = getattr(importlib.import_module({module!r}), {function!r})\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "print('\\n'.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    return frozenset(out.split())


def function_imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement inside a function or method, with the name of the innermost function."""
    found = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if function and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, function))
            visit(child, child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function)

    visit(tree, None)
    return found


def reason_of(node: ast.stmt, lines: list[str], import_lines: set[int]) -> str | None:
    """The text after ``# deferred:`` on the statement's lines, else the nearest one above it, across blank lines,
    comments, ``try:`` and the other imports of its group (whose own line comments are theirs)."""
    own = lines[node.lineno - 1:node.end_lineno]
    above, i = [], node.lineno - 2
    while i >= 0 and (i in import_lines or lines[i].strip() in ("", "try:") or lines[i].lstrip().startswith("#")):
        if i not in import_lines:
            above.append(lines[i])
        i -= 1
    return next((line.split(MARK, 1)[1].strip() for line in own + above if MARK in line), None)


def deferrals(path: Path) -> tuple[list[tuple[ast.stmt, str, str | None]], ast.Module]:
    """(import inside a function, the function's name, its reason or None) for each such import of ``path``, and
    the parsed module."""
    lines = path.read_text(encoding="utf-8").splitlines()
    tree = ast.parse("\n".join(lines))
    found = function_imports(tree)
    import_lines = {i for node, _ in found for i in range(node.lineno - 1, node.end_lineno)}
    return [(node, function, reason_of(node, lines, import_lines)) for node, function in found], tree


def top_level_packages(tree: ast.Module) -> set[str]:
    """The top-level names of the third-party (and stdlib) packages a module imports outside functions."""
    found = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.update(a.name.split(".")[0] for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.add(child.module.split(".")[0])
            elif not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)

    visit(tree)
    return found - {"expmae", "__future__"}


def deferral_problems(package: Path, start_ups: dict[str, frozenset[str]], allowed_upward) -> list[str]:
    """One line per import inside a function of ``package`` whose deferral gives no reason of REASONS, or one that
    the code contradicts; ``start_ups``: script -> the modules its --help loads."""
    known, problems = modules(package), []
    for module, path in sorted(known.items()):
        rel = path.relative_to(package.parent).as_posix()
        found, tree = deferrals(path)
        at_top = top_level_packages(tree)
        for node, function, reason in found:
            text = ast.unparse(node)
            ours = targets(node, known)
            tops = {name.split(".")[0] for name in ([a.name for a in node.names] if isinstance(node, ast.Import)
                                                    else [node.module or ""])} - {"expmae"}
            kind = next((k for k in REASONS if reason and reason.startswith(k + ":") and reason[len(k) + 1:].strip()),
                        None)
            where = f"{rel}:{node.lineno} `{text}` in {function}()"
            if kind is None:
                problems.append(f"{where}: no '{MARK} <kind>: <why>' comment with a kind of {sorted(REASONS)}"
                                + (f" (found {reason!r})" if reason else ""))
            elif kind == "console start-up" and not any(module in loaded and (ours | tops) - loaded
                                                         for loaded in start_ups.values()):
                problems.append(f"{where}: console start-up, but no light console script's --help loads {module} "
                                f"without {sorted(ours | tops)}")
            elif kind == "optional dependency" and (not tops or tops & (at_top | set(sys.stdlib_module_names))):
                problems.append(f"{where}: optional dependency, but {sorted(tops) or 'expmae'} is not a third-party "
                                "package the file leaves out of its top-level imports")
            elif kind == "upward shim" and (not ours or any((module, t) not in allowed_upward for t in ours)):
                problems.append(f"{where}: upward shim, but {sorted((module, t) for t in ours)} "
                                "is not in ALLOWED_UPWARD")
    return problems


def test_light_console_scripts_help_loads_no_heavy_library():
    heavy = {name: sorted(m for m in ("torch", "transformers", "timm", "accelerate", "deepspeed", "facenet_pytorch",
                                      "sklearn", "matplotlib", "av") if m in help_start_up(target))
             for name, target in LIGHT_HELP_SCRIPTS.items()}
    assert not any(heavy.values()), heavy


def test_every_import_inside_a_function_says_why_it_is_deferred():
    start_ups = {name: help_start_up(target) for name, target in LIGHT_HELP_SCRIPTS.items()}
    problems = deferral_problems(PACKAGE, start_ups, ALLOWED_UPWARD)
    assert not problems, "\n".join(problems)


def test_the_deferral_check_reads_comments_and_checks_each_kind(tmp_path):
    pkg = tmp_path / "expmae"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("def __getattr__(name):\n"
                                     "    from expmae.heavy import thing  # deferred: upward shim: expmae.thing\n"
                                     "    return thing\n")
    (pkg / "heavy.py").write_text("import torch\nthing = 1\n")
    (pkg / "cli.py").write_text(
        "import numpy\n"
        "def main():\n"
        "    # deferred: console start-up: torch (+2 s on --help)\n"
        "    # and transformers\n"
        "    import torch\n"
        "    from transformers import AutoModel\n"
        "\n"
        "    from expmae.heavy import thing\n"
        "    try:\n"
        "        import TTS  # deferred: optional dependency: the tts extra\n"
        "    except ImportError:\n"
        "        pass\n"
        "    import numpy  # deferred: optional dependency: but imported at the top\n"
        "    import json\n"
        "    import csv  # deferred: import cycle: csv\n"
        "    import os  # deferred: console start-up: os\n"
        "    from expmae import heavy  # deferred: upward shim: not declared\n"
        "    import yaml  # a comment, but not a deferral reason\n"
        "\n"
        "class C:\n"
        "    def method(self):\n"
        "        import torch  # deferred: console start-up:\n")
    start_ups = {"tool": frozenset({"expmae", "expmae.cli", "os"})}
    upward = {("expmae", "expmae.heavy"): "lazy"}
    problems = deferral_problems(pkg, start_ups, upward)
    assert [p.split(":")[1].split(" ")[0] for p in problems] == ["13", "14", "15", "16", "17", "18", "22"], problems
    assert "console start-up, but no light console script's --help loads expmae.cli without ['os']" in problems[3]
    assert "found 'import cycle: csv'" in problems[2] and "found 'console start-up:'" in problems[6]
    # the same code with the module outside every start-up: a console start-up reason no longer holds
    moved = deferral_problems(pkg, {"tool": frozenset({"expmae"})}, upward)
    assert sum("console start-up, but" in p for p in moved) == 4, moved
