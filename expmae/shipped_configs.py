"""The configs shipped inside the package: training configs, accelerate launcher configs, finetune configs.

They travel with the wheel (package data), so an installed expmae needs no checkout::

    expmae-configs                               # list them, by kind
    expmae-configs path deepspeed_zero2          # the file's path, for accelerate launch --config_file
    expmae-configs copy vit_base_16x224 my.yaml  # a copy to edit

``python -m expmae.pretrain --config NAME`` and ``expmae-finetune --config NAME`` take a shipped config's name
wherever they take a path.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

from expmae import add_version_argument

# kind -> folder inside the package (relative to expmae/)
KINDS = {
    "pretrain": "pretrain/configs",
    "accelerate": "pretrain/configs/accelerate",
    "finetune": "finetune/configs",
}


def config_dir(kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown config kind {kind!r}; expected one of {', '.join(KINDS)}")
    return Path(str(resources.files("expmae"))) / KINDS[kind]


def list_configs(kind: str) -> list[str]:
    """Names (file stems) of the shipped configs of one kind, sorted."""
    folder = config_dir(kind)
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def find_config(name: str, kinds: tuple[str, ...] = tuple(KINDS)) -> Path:
    """A shipped config by name (``vit_base_16x224``, with or without ``.yaml``), searched in ``kinds`` in order."""
    stem = name[:-5] if name.endswith(".yaml") else name
    for kind in kinds:
        path = config_dir(kind) / f"{stem}.yaml"
        if path.is_file():
            return path
    known = sorted({n for kind in kinds for n in list_configs(kind)})
    raise FileNotFoundError(f"no shipped config named {name!r} (kinds: {', '.join(kinds)}); "
                            f"shipped: {', '.join(known) or 'none'}")


def resolve_config(name_or_path: str | Path, kind: str) -> Path:
    """An existing file path as it is, else the shipped config of ``kind`` with that name (one-line error)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix in ("", ".yaml") and path.parent == Path("."):
        return find_config(str(name_or_path), (kind,))
    raise FileNotFoundError(f"config {name_or_path} does not exist (a path to a YAML file, or the name of a "
                            f"shipped {kind} config: {', '.join(list_configs(kind))})")


def format_listing(kinds: tuple[str, ...] = tuple(KINDS)) -> str:
    lines = []
    for kind in kinds:
        lines.append(f"{kind} configs ({config_dir(kind)}):")
        lines += [f"  {name}" for name in list_configs(kind)] or ["  (none)"]
    return "\n".join(lines)


def add_list_configs_argument(parser: argparse.ArgumentParser, kinds: tuple[str, ...]) -> None:
    """``--list-configs`` for a command line: print the shipped configs of ``kinds`` and exit (like --version)."""

    class ListConfigs(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(format_listing(kinds))
            parser.exit()

    parser.add_argument("--list-configs", nargs=0, action=ListConfigs,
                        help=f"list the shipped {' and '.join(kinds)} configs and exit")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="expmae-configs", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    add_version_argument(p)
    p.add_argument("--list-configs", action="store_true", help="list the shipped configs (the default action)")
    p.add_argument("action", nargs="?", choices=("list", "path", "copy"), default="list")
    p.add_argument("name", nargs="?", help="a shipped config's name (path, copy)")
    p.add_argument("dest", nargs="?", help="where to copy it (copy; default ./NAME.yaml)")
    args = p.parse_args(argv)
    if args.action == "list" or args.list_configs:
        print(format_listing())
        return 0
    if not args.name:
        p.error(f"{args.action} needs a config name; see expmae-configs list")
    try:
        path = find_config(args.name)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.action == "path":
        print(path)
        return 0
    dest = Path(args.dest or f"{path.name}")
    if dest.exists():
        print(f"error: {dest} exists; not overwriting", file=sys.stderr)
        return 2
    shutil.copyfile(path, dest)
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
