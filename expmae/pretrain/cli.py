"""The pretraining command line: parse, load and validate the config (before torch is imported), then train.

    accelerate launch --config_file LAUNCHER.yaml -m expmae.pretrain --config NAME_OR_PATH \\
        [--resume auto|none|PATH] [section.key=value ...]
"""
from __future__ import annotations

import argparse
import os
import sys

from expmae import add_version_argument
from expmae.config import ConfigError, describe, load_config, to_yaml  # light: no torch
from expmae.parentdeath import die_with_parent, launched
from expmae.shipped_configs import add_list_configs_argument, resolve_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m expmae.pretrain", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(p)
    p.add_argument("--config", help="training config: a shipped config's name (see --list-configs) or a YAML path; "
                                    "defaults when omitted")
    p.add_argument("--resume", default="none", metavar="auto|none|PATH",
                   help="auto: continue from the newest checkpoint of train.output_dir if there is one; "
                        "PATH: a checkpoint or run folder; none (default): fresh run")
    p.add_argument("--check", action="store_true", help="validate the config, print it resolved and exit (no torch)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    add_list_configs_argument(p, ("pretrain", "accelerate"))
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.batch_size=8")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if launched():  # first: a rank must not outlive its launcher (whose agent starts it in a session of its own)
        die_with_parent()
    args = parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    # Under a launcher every rank reaches the same verdict on these errors: say it once.
    say = (lambda msg: print(msg, file=sys.stderr)) if os.environ.get("RANK", "0") == "0" else (lambda msg: None)
    try:
        path = resolve_config(args.config, "pretrain") if args.config else None
        cfg = load_config(path, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        say(f"config error: {exc}")
        return 2
    if args.check:
        print(to_yaml(cfg).rstrip())
        return 0

    # deferred: console start-up: torch, accelerate and DeepSpeed (+3 s), after the config is known to be valid
    from expmae.pretrain.train import DataStallError, NonFiniteLossError, train
    from expmae.runlock import FolderInUse

    try:
        train(cfg, resume=args.resume)
    except (ConfigError, NonFiniteLossError, DataStallError, FileExistsError, FolderInUse) as exc:
        say(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
