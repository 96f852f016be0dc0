"""The package installs what it imports: every third-party module that expmae/ imports (top-level and function-level
``import``, ``from ... import``, ``importlib.import_module("literal")``) is declared in setup.cfg, either in
install_requires or in an extra that the one-line error raised where that optional import is missing names
(``pip install 'expmae[EXTRA]'``). A module declared only in an extra must be imported, in every file that imports
it, under ``try: ... except ImportError: raise ...("... expmae[EXTRA] ...")``.

tools/check_wheel.sh checks the same from the other side: the wheel in a fresh environment with only its
declared dependencies runs expmae-crop and expmae-demo.
"""
from __future__ import annotations

import ast
import configparser
import functools
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Import names of distributions whose import name is not their normalised name, for when the distribution is not
# installed here (packages_distributions() knows the installed ones).
IMPORT_NAMES = {
    "pillow": {"PIL"}, "pyyaml": {"yaml"}, "scikit-learn": {"sklearn"}, "scikit-image": {"skimage"},
    "facenet-pytorch": {"facenet_pytorch"}, "coqui-tts": {"TTS"}, "opencv-python": {"cv2"},
    "opencv-python-headless": {"cv2"}, "av": {"av"}, "protobuf": {"google"},
}
# Modules of one distribution that import another one (which the import walk cannot see): module -> distribution.
NEEDS = {"torch.utils.tensorboard": "tensorboard"}


def normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()  # PEP 503


def requirement_lines(text: str) -> list[str]:
    """Distribution names (normalised) of a setup.cfg requirement list, comments and markers dropped."""
    names = []
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.append(normalise(re.match(r"[A-Za-z0-9._-]+", line).group(0)))
    return names


def declared_groups(setup_cfg: str) -> dict[str, list[str]]:
    """{"install_requires": [...], extra: [...]} of normalised distribution names, from setup.cfg's text."""
    cfg = configparser.ConfigParser()
    cfg.read_string(setup_cfg)
    groups = {"install_requires": requirement_lines(cfg["options"]["install_requires"])}
    if cfg.has_section("options.extras_require"):
        groups.update({extra: requirement_lines(text) for extra, text in cfg["options.extras_require"].items()})
    return groups


@functools.cache
def installed_import_names() -> dict[str, set[str]]:
    """Normalised distribution name -> its top-level modules, for what is installed here."""
    installed: dict[str, set[str]] = {}
    for module, dists in packages_distributions().items():
        for dist in dists:
            installed.setdefault(normalise(dist), set()).add(module)
    return installed


def import_names(distribution: str) -> set[str]:
    return (IMPORT_NAMES.get(distribution) or installed_import_names().get(distribution)
            or {distribution.replace("-", "_")})


def declared_modules(setup_cfg: str) -> dict[str, set[str]]:
    """Top-level import name -> the groups (install_requires or extras) that declare its distribution."""
    out: dict[str, set[str]] = {}
    for group, distributions in declared_groups(setup_cfg).items():
        for dist in distributions:
            for module in import_names(dist):
                out.setdefault(module, set()).add(group)
            out.setdefault(f"dist:{dist}", set()).add(group)  # for NEEDS, which names distributions
    return out


def imported_names(node: ast.AST) -> list[str]:
    """Absolute module names an AST node imports (relative imports are the package's own)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str) and not node.args[0].value.startswith("."):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "import_module":
            return [node.args[0].value]
    return []


def third_party_imports(package: Path) -> dict[str, list[tuple[Path, ast.AST]]]:
    """Top-level third-party module -> [(file, import node)] over every .py file of ``package``; a module of
    NEEDS counts as an import of ``dist:<distribution>``."""
    own = package.name
    found: dict[str, list[tuple[Path, ast.AST]]] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = imported_names(node)
            tops = {n.split(".")[0] for n in names} - {own} - set(sys.stdlib_module_names)
            for top in tops | {f"dist:{NEEDS[n]}" for n in names if n in NEEDS}:
                found.setdefault(top, []).append((path, node))
    return found


def module_strings(tree: ast.Module) -> dict[str, str]:
    """Module-level NAME = "string" assignments (an install hint kept in a constant)."""
    return {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            for target in node.targets if isinstance(target, ast.Name)}


def catches_import_error(handler: ast.ExceptHandler) -> bool:
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(k, ast.Name) and k.id in ("ImportError", "ModuleNotFoundError") for k in kinds)


def guard_messages(path: Path, module: str) -> list[str]:
    """The text of each ``raise`` in an ImportError handler of a ``try`` whose body imports ``module``
    (string constants and f-string parts, module-level string constants it names resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    constants = module_strings(tree)
    messages = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        imports = {n.split(".")[0] for stmt in node.body for sub in ast.walk(stmt) for n in imported_names(sub)}
        if module not in imports:
            continue
        for handler in filter(catches_import_error, node.handlers):
            for raise_node in (n for stmt in handler.body for n in ast.walk(stmt) if isinstance(n, ast.Raise)):
                parts = [n.value for n in ast.walk(raise_node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                parts += [constants[n.id] for n in ast.walk(raise_node) if isinstance(n, ast.Name) and n.id in constants]
                messages.append("".join(parts))
    return messages


def undeclared(package: Path, setup_cfg: str) -> list[str]:
    """One line per third-party import that setup.cfg does not cover (empty: all declared)."""
    declared = declared_modules(setup_cfg)
    problems = []
    for module, sites in sorted(third_party_imports(package).items()):
        groups = declared.get(module, set())
        where = sorted({f"{path.relative_to(package.parent)}:{node.lineno}" for path, node in sites})
        if not groups:
            problems.append(f"{module}: imported at {', '.join(where)} but declared nowhere in setup.cfg")
        elif "install_requires" not in groups:
            for path in sorted({path for path, _ in sites}):
                hints = [m for m in guard_messages(path, module) if "\n" not in m
                         and any(f"expmae[{extra}]" in m for extra in groups)]
                if not hints:
                    problems.append(f"{module}: only in extras {sorted(groups)}, but {path.relative_to(package.parent)} "
                                    f"imports it without a one-line ImportError naming expmae[<extra>]")
    return problems


# ------------------------------------------------------------------------------------------------------- tests
def test_every_third_party_import_of_the_package_is_declared():
    assert undeclared(REPO / "expmae", (REPO / "setup.cfg").read_text()) == []


def test_av_is_a_core_dependency():
    """PyAV writes every clip expmae-crop makes (expmae.video.VideoWriter): without it the pipeline stops at its
    first step, so removing it from install_requires must fail the check above."""
    setup_cfg = (REPO / "setup.cfg").read_text()
    assert "av" in declared_groups(setup_cfg)["install_requires"]
    without_av = re.sub(r"^\s*av>=[^\n]*\n", "", setup_cfg, flags=re.M)
    assert "av" not in declared_groups(without_av)["install_requires"]
    problems = undeclared(REPO / "expmae", without_av)
    assert any(p.startswith("av: ") and "expmae/video.py" in p for p in problems), problems


def test_the_walk_sees_every_kind_of_import_and_checks_optional_ones(tmp_path):
    pkg = tmp_path / "expmae"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import os\nimport numpy as np\nfrom . import sub\nfrom expmae.sub import x\n")
    (pkg / "sub" / "__init__.py").write_text(
        "import importlib\n"
        "def f():\n    from PIL import Image\n    importlib.import_module('yaml')\n    importlib.import_module('.x', 'expmae')\n"
        "HINT = \"pip install 'expmae[tts]'\"\n"
        "def g():\n    try:\n        import TTS\n    except ImportError as exc:\n        raise ImportError(f'needs coqui ({exc}): {HINT}')\n"
        "def h():\n    from torch.utils.tensorboard import SummaryWriter\n")
    found = third_party_imports(pkg)
    assert set(found) == {"numpy", "PIL", "yaml", "TTS", "torch", "dist:tensorboard"}
    assert [node.lineno for _, node in found["yaml"]] == [4]
    cfg = "[options]\ninstall_requires =\n    numpy>=1\n    Pillow\n    PyYAML  # yaml\n    torch\n    tensorboard\n" \
          "[options.extras_require]\ntts =\n    coqui-tts[codec]>=0.28\n"
    assert undeclared(pkg, cfg) == []
    # a missing distribution, and an extra whose error does not name it, are both reported
    assert undeclared(pkg, cfg.replace("    PyYAML  # yaml\n", "")) == [
        "yaml: imported at expmae/sub/__init__.py:4 but declared nowhere in setup.cfg"]
    assert undeclared(pkg, cfg.replace("tts =", "speech =")) == [
        "TTS: only in extras ['speech'], but expmae/sub/__init__.py imports it without a one-line ImportError "
        "naming expmae[<extra>]"]
    assert undeclared(pkg, cfg.replace("    tensorboard\n", ""))[0].startswith("dist:tensorboard: imported at")
