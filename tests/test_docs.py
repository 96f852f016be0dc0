"""The docs cannot drift from the code: commands are read from the pages' own text.

- Every fenced bash block of README.md and docs/ is parsed; each expmae command (console scripts, tools/*.py,
  python -m expmae.*, accelerate launch ... -m expmae.pretrain, bash tools/*.sh, make) must name a script that
  exists and flags its --help accepts, and every shipped config it names must exist. GPU-sized and hub-dependent
  commands are checked this way, not run.
- Blocks marked ``<!-- docs-test: run -->`` run, in page order, in one scratch folder holding a synthetic labelled
  set: first the README's quick start (``run quickstart``; its ``config=...`` line gets ``train.max_steps=4``),
  then the guides' blocks, which build on its outputs.
- The MER2023 recipe's commands produce exactly the folders the shipped mer2023_* finetune configs read.
"""
from __future__ import annotations

import configparser
import csv
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launching import free_port

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
RUN_MARK = re.compile(r"<!--\s*docs-test:\s*run(?:\s+(\w+))?\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
QUICKSTART_SETTING = "config=tiny_demo"
TOY_SETTING = 'config="tiny_demo train.max_steps=4 checkpoint.every=4 log.recon_every=4"'


# ------------------------------------------------------------------------------------------------ reading pages


def pages() -> list[Path]:
    """README first, then the site's pages in nav order (the order marked blocks run in)."""
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]

    def walk(item):
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for v in item.values():
                yield from walk(v)
        elif isinstance(item, list):
            for v in item:
                yield from walk(v)

    return [REPO / "README.md", *(DOCS / p for p in walk(nav))]


def blocks(path: Path) -> list[dict]:
    """Fenced code blocks: language, text, line and the run marker (an HTML comment in the lines just above)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        mark = None
        k = i - 1
        while k >= 0 and lines[k].strip().startswith("<!--"):
            found = RUN_MARK.search(lines[k])
            if found:
                mark = found.group(1) or "run"
            k -= 1
        out.append({"lang": m.group(1), "text": "\n".join(lines[i + 1:j]), "line": i + 1, "mark": mark,
                    "where": f"{path.relative_to(REPO)}:{i + 1}"})
        i = j + 1
    return out


def bash_blocks() -> list[dict]:
    return [b for p in pages() for b in blocks(p) if b["lang"] in ("bash", "sh")]


def commands(text: str) -> list[list[str]]:
    """Simple commands of a bash block (continuations joined, comments dropped, split at ; && || |), with the
    commands inside ``bash -c '...'`` and ``$(...)`` parsed too."""
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote in a for-loop one-liner and the like: not a command we check
            continue
        current: list[str] = []
        for tok in tokens + [";"]:
            if tok in (";", "&&", "||", "|"):
                if current:
                    out.append(current)
                current = []
            else:
                current.append(tok)
    for cmd in list(out):
        for a, b in zip(cmd, cmd[1:]):
            if a == "-c" and cmd[0] == "bash":
                out += commands(b)
        for tok in cmd:
            out += [shlex.split(s) for s in re.findall(r"\$\(([^()]*)\)", tok)]
    return out


# ------------------------------------------------------------------------------------------------ what exists


@functools.cache
def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return {name.strip(): target.strip() for name, _, target in (ln.partition("=") for ln in lines)}


@functools.cache
def output(*argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(list(argv), capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
    assert r.returncode == 0, f"{' '.join(argv)} failed:\n{r.stderr[-2000:]}"
    return r.stdout


def help_text(*argv: str) -> str:
    """``--help`` of a program given as the argv that starts it (with this interpreter)."""
    return output(*argv, "--help")


def script_argv(name: str) -> list[str]:
    module, _, func = console_scripts()[name].partition(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {func} as m; sys.exit(m())"
    return [sys.executable, "-c", code]


@functools.cache
def shipped() -> dict[str, set[str]]:
    from expmae.shipped_configs import KINDS, list_configs

    return {kind: set(list_configs(kind)) for kind in KINDS}


def flags(tokens: list[str]) -> list[str]:
    return [t.split("=", 1)[0] for t in tokens if t.startswith("--") and len(t) > 2]


def assert_flags(where: str, program: str, tokens: list[str], helptext: str) -> None:
    for flag in flags(tokens):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helptext), \
            f"{where}: {program} does not accept {flag} (not in its --help)"


def check_pretrain_args(where: str, args: list[str]) -> None:
    assert_flags(where, "expmae.pretrain", args, help_text(sys.executable, "-m", "expmae.pretrain"))
    if "--config" in args:
        name = args[args.index("--config") + 1]
        if not name.startswith("$"):
            ok = name in shipped()["pretrain"] or (REPO / name).is_file()
            assert ok, f"{where}: --config {name}: not a shipped pretraining config nor a file in the repository"
    keys = output(sys.executable, "-m", "expmae.pretrain", "--help-config")
    sections = {m.group(1): set() for m in re.finditer(r"^(\w+):$", keys, re.M)}
    section = None
    for line in keys.splitlines():
        if re.match(r"^\w+:$", line):
            section = line[:-1]
        elif section and (m := re.match(r"^  (\w+):", line)):
            sections[section].add(m.group(1))
    for tok in args:
        if re.match(r"^[a-z_]+\.[a-z_]+=", tok):
            section, key = tok.split("=", 1)[0].split(".")
            assert key in sections.get(section, ()), f"{where}: unknown pretraining config key {section}.{key}"


def check_module(where: str, module: str, args: list[str]) -> None:
    """``python -m MODULE args`` (or launched by accelerate); expmae.features takes its modality first."""
    if module == "expmae.pretrain":
        check_pretrain_args(where, args)
    elif module == "expmae.features" and args and not args[0].startswith("-"):
        assert_flags(where, f"{module} {args[0]}", args[1:], help_text(sys.executable, "-m", module, args[0]))
    else:
        assert_flags(where, module, args, help_text(sys.executable, "-m", module))


def check_command(where: str, cmd: list[str]) -> bool:
    """Check one command if it is one of the project's; returns whether it was."""
    while cmd and re.match(r"^[A-Za-z_]\w*=", cmd[0]):  # leading variable assignments
        cmd = cmd[1:]
    if not cmd:
        return False
    prog, args = cmd[0], cmd[1:]
    if prog in console_scripts():
        if prog == "expmae-features" and args and not args[0].startswith("-"):
            assert_flags(where, f"{prog} {args[0]}", args[1:], help_text(*script_argv(prog), args[0]))
        elif prog == "expmae-configs" and args[:1] in (["path"], ["copy"]):
            names = set().union(*shipped().values())
            assert args[1] in names or args[1].startswith("$"), f"{where}: expmae-configs: no shipped config {args[1]}"
        else:
            assert_flags(where, prog, args, help_text(*script_argv(prog)))
        if prog == "expmae-finetune" and "--config" in args:
            name = args[args.index("--config") + 1]
            assert name in shipped()["finetune"], f"{where}: no shipped finetune config {name}"
        return True
    if prog.startswith("expmae-"):
        raise AssertionError(f"{where}: {prog} is not a console script of setup.cfg")
    if prog in ("python", "python3") and args[:1] == ["-m"] and args[1].startswith("expmae"):
        check_module(where, args[1], args[2:])
        return True
    if prog in ("python", "python3") and args and args[0].startswith("tools/"):
        assert (REPO / args[0]).is_file(), f"{where}: {args[0]} does not exist"
        assert_flags(where, args[0], args[1:], help_text(sys.executable, str(REPO / args[0])))
        return True
    if prog == "bash" and args and args[0].startswith("tools/"):
        script = REPO / args[0]
        assert script.is_file(), f"{where}: {args[0]} does not exist"
        assert_flags(where, args[0], args[1:], script.read_text())
        return True
    if prog == "accelerate" and args[:1] == ["launch"]:
        rest = args[1:]
        target = next(i for i, t in enumerate(rest) if t == "-m" or t.endswith(".py"))
        assert_flags(where, "accelerate launch", rest[:target], help_text(sys.executable, "-m", "accelerate.commands.launch"))
        if rest[target] == "-m":
            assert rest[target + 1].startswith("expmae."), f"{where}: accelerate launches {rest[target + 1]}"
            check_module(where, rest[target + 1], rest[target + 2:])
        else:
            assert (REPO / rest[target]).is_file(), f"{where}: {rest[target]} does not exist"
            check_pretrain_args(where, rest[target + 1:])
        return True
    if prog == "make":
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
        assert set(args) <= targets, f"{where}: make {args}: no such target"
        return True
    return False


def test_every_command_in_the_docs_names_real_scripts_flags_and_configs():
    checked = 0
    for block in bash_blocks():
        for cmd in commands(block["text"]):
            checked += check_command(block["where"], cmd)
    assert checked >= 60, f"only {checked} commands recognised: the parser lost track of the pages"


def test_the_checker_catches_a_wrong_flag_and_a_missing_config():
    with pytest.raises(AssertionError, match="--no-such-flag"):
        check_command("x", ["expmae-crop", "in", "out", "--no-such-flag"])
    with pytest.raises(AssertionError, match="no shipped finetune config"):
        check_command("x", ["expmae-finetune", "--config", "mer2023_nonexistent"])
    with pytest.raises(AssertionError, match="unknown pretraining config key"):
        check_pretrain_args("x", ["--config", "tiny_demo", "train.no_such_key=1"])


def test_pages_link_only_to_files_that_exist():
    """README's links into docs/ (the site's own links are checked by mkdocs build --strict)."""
    text = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (REPO / target).exists(), f"README.md links to {target}, which does not exist"


def test_readme_is_short_and_its_quick_start_is_marked():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    marked = [b for b in blocks(REPO / "README.md") if b["mark"] == "quickstart"]
    assert len(marked) == 1 and marked[0]["text"].count(QUICKSTART_SETTING) == 1
    assert "make demo" in readme and "make test" in readme


# ------------------------------------------------------------------------------------------------ running them


def write_sample_set(work: Path) -> None:
    """The quick start's inputs: videos/, labels.csv (MER2023 layout), test.csv (names only)."""
    from expmae.synthetic import write_expression_benchmark

    paths = write_expression_benchmark(work / "sample", "static", num_frames=16, size=128, framing="scene",
                                       identities=7, test_identities=2, clips_per_identity=4)
    shutil.move(str(paths["videos"]), work / "videos")
    shutil.copy(paths["train"], work / "labels.csv")
    with open(paths["test"]) as f:
        names = [row["name"] for row in csv.DictReader(f)]
    (work / "test.csv").write_text("name\n" + "".join(n + "\n" for n in names))


def run_block(block: dict, work: Path, text: str) -> None:
    # accelerate's default port may be taken by another run on this machine: the test adds a free one
    prelude = (f'accelerate() {{ if [ "$1" = launch ]; then shift; command accelerate launch '
               f'--main_process_port {free_port()} "$@"; else command accelerate "$@"; fi; }}\nset -euo pipefail\n')
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", "-c", prelude + text], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{block['where']} failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.mark.timeout(900)
def test_marked_commands_run_as_written(tmp_path):
    write_sample_set(tmp_path)
    marked = [b for b in bash_blocks() if b["mark"]]
    assert marked and marked[0]["mark"] == "quickstart", "the README's quick start must be the first marked block"
    quick = marked[0]["text"]
    run_block(marked[0], tmp_path, quick.replace(QUICKSTART_SETTING, TOY_SETTING, 1))
    predictions = tmp_path / "runs" / "finetune" / "predictions_test.csv"
    test_names = (tmp_path / "test.csv").read_text().split()[1:]
    with open(predictions) as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == test_names and set(rows[0]) == {"name", "discrete", "valence"}
    for block in marked[1:]:
        run_block(block, tmp_path, block["text"])
    assert (tmp_path / "runs" / "finetune-try" / "predictions_test.csv").is_file()
    assert sum(1 for _ in (tmp_path / "features" / "expmae-try-video-UTT").glob("*.npy")) == 28


# ------------------------------------------------------------------------------------------------ MER2023 recipe


def recipe_outputs() -> dict[str, set[str]]:
    """What the recipe's commands write: crop folders, encoder folders, feature folders, test files read."""
    from expmae.features.common import feature_dir_name, parse_layers

    layers = {"audio": "-1", "text": "-4,-3,-2,-1"}
    out: dict[str, set[str]] = {"placed": set(), "crops": set(), "encoders": set(), "features": set(),
                                "finetune_configs": set()}
    for block in blocks(DOCS / "mer2023.md"):
        for cmd in commands(block["text"]) if block["lang"] == "bash" else []:
            prog, args = cmd[0], cmd[1:]
            pos = [a for i, a in enumerate(args) if not a.startswith("-") and not args[i - 1].startswith("--")] \
                if args else []
            if prog in ("cp", "ln"):
                out["placed"].add(pos[-1])
            elif prog == "expmae-crop" and len(pos) == 2:
                out["crops"].add(pos[1])
            elif prog == "expmae-export":
                out["encoders"].add(pos[1])
            elif prog == "expmae-features":
                modality, root, model = pos[0], pos[2], args[args.index("--model") + 1]
                if modality in ("video", "frame"):
                    name = f"{Path(model).name}-{modality}-UTT"
                else:
                    name = feature_dir_name(model, "mean", parse_layers(layers.get(modality, "-1")))
                out["features"].add(f"{root}/{name}")
            elif prog == "expmae-finetune" and "--config" in args:
                out["finetune_configs"].add(args[args.index("--config") + 1])
    return out


def test_the_mer2023_recipe_produces_what_the_shipped_configs_read():
    from expmae.shipped_configs import find_config

    made = recipe_outputs()
    page = (DOCS / "mer2023.md").read_text()
    assert made["finetune_configs"] == {"mer2023_attention", "mer2023_semi_weak", "mer2023_e2e"}
    for name in made["finetune_configs"]:
        cfg = yaml.safe_load(find_config(name, ("finetune",)).read_text())
        for entry in cfg["features"]:
            assert entry.split("=", 1)[1] in made["features"], f"{name} reads {entry}; the recipe writes {made['features']}"
        if "videos" in cfg:
            assert cfg["videos"] in made["crops"], f"{name}: videos {cfg['videos']} is not a crop folder of the recipe"
            assert cfg["encoder"] in made["encoders"], f"{name}: encoder {cfg['encoder']} is not exported by the recipe"
        for path in [cfg["labels"], *cfg.get("test", [])]:
            assert path in made["placed"], f"{name} reads {path}, which the recipe does not put in place"
        out_dir = cfg["out_dir"]
        stem = Path(cfg["test"][0]).stem
        if name == "mer2023_semi_weak":
            assert f"{out_dir}/predictions_{stem}.csv" in page, "the recipe must end in the config's predictions file"


def test_the_architecture_page_lists_the_declared_import_layers():
    """docs/architecture.md's layer table names the layers of expmae.architecture.LAYERS, in order, each with its
    modules (the import test enforces LAYERS; this keeps the page from drifting)."""
    from expmae.architecture import LAYERS

    rows = [line for line in (DOCS / "architecture.md").read_text().splitlines() if re.match(r"\| \d\. ", line)]
    assert [re.match(r"\| (\d)\. (\w+)", r).groups() for r in rows] == [(str(i), name) for i, (name, _, _) in enumerate(LAYERS)]
    for row, (_, _, patterns) in zip(rows, LAYERS):
        cell = row.split("|")[2]
        for pattern in patterns:
            short = pattern.removeprefix("expmae.").replace(".*", "").replace("*.", "") if pattern != "expmae" else "expmae"
            assert short.replace("_*", "") in cell, (pattern, row)
