"""Settings declared once: a dataclass field with its type, default, checks and help (:func:`setting`); YAML / CLI
values coerced to the field's type (:func:`coerce`); range and choice checks (:func:`check`); one-line errors with a
"did you mean" (:func:`unknown_key`); old spellings of renamed settings (:func:`rename`, :func:`rename_keys`); argparse
flags and --help generated from the fields (:func:`add_arguments`). Standard library only, so a bad setting fails
before torch is imported.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
import warnings
from dataclasses import field
from typing import Any, Callable, Mapping, Sequence


class ConfigError(ValueError):
    """A bad setting: the message is one line naming the key, the value and what is allowed."""


def setting(default: Any = None, help: str = "", **checks: Any) -> Any:
    """A dataclass field with its help text and checks in metadata: ``choices``, ``min`` / ``max`` (inclusive),
    ``gt`` / ``lt`` (exclusive); for :func:`add_arguments` also ``flag`` (its name, default ``--field-name``),
    ``aliases``, ``parse`` (argparse type), ``group`` (argument group title), ``metavar``."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


def allowed(names: Sequence[str]) -> str:
    return ", ".join(names)


def unknown_key(key: str, name: str, known: Sequence[str], where: str, what: str = "key",
                renamed: Mapping[str, str] | None = None) -> ConfigError:
    """``{where}unknown {what} '{key}' (did you mean '...'?); allowed: ...``: ``name`` is matched against ``known``
    and the old spellings in ``renamed`` (a match there suggests the new name)."""
    renamed = renamed or {}
    close = difflib.get_close_matches(name, [*known, *renamed], n=1)
    hint = f" (did you mean '{renamed.get(close[0], close[0])}'?)" if close else ""
    return ConfigError(f"{where}unknown {what} '{key}'{hint}; allowed: {allowed(known)}")


def rename(key: str, renamed: Mapping[str, str], where: str | None = "", prefix: str = "") -> str:
    """The current name of setting ``key`` (``renamed`` maps old spellings to new ones). An old spelling works with a
    one-line FutureWarning naming ``{where}{prefix}{key}`` and its new name; ``where=None`` renames silently, for
    files an earlier expmae wrote (checkpoints, exported folders), which nobody can be asked to re-spell."""
    new = renamed.get(key)
    if new is None:
        return key
    if where is not None:
        warnings.warn(f"{where}{prefix}{key} is renamed {prefix}{new}; the old name still works but is deprecated",
                      FutureWarning, stacklevel=3)
    return new


def rename_keys(data: Mapping[str, Any], renamed: Mapping[str, str], where: str | None = "",
                prefix: str = "") -> dict[str, Any]:
    """``data`` with every old spelling of ``renamed`` under its new name (see :func:`rename`); an old and a new
    spelling of one setting with different values is a ConfigError."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        new = rename(key, renamed, where, prefix)
        if new in out and out[new] != value:
            old = key if new != key else next(k for k, n in renamed.items() if n == new and k in data)
            raise ConfigError(f"{where or ''}{prefix}{old} (the old name of {prefix}{new}) and {prefix}{new} are both "
                              f"set, to different values; keep {prefix}{new}")
        out[new] = value
    return out


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin in (tuple, list):
        plural = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
        inner = plural.get(args[0], "values") if args else "values"
        n = "" if origin is list or (len(args) == 2 and args[1] is Ellipsis) else f" {len(args)}"
        return f"a list of{n} {inner}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def coerce(value: Any, tp: Any) -> Any:
    """Convert a YAML value or a CLI string to ``tp``; raise ValueError when it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~"))):
            return None
        for arg in (a for a in args if a is not type(None)):
            return coerce(value, arg)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ValueError
    if tp is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.replace("_", ""))
        raise ValueError
    if tp is float:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        raise ValueError
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError
    if origin in (tuple, list):
        if isinstance(value, str):
            import yaml  # deferred: console start-up: PyYAML, +11 ms on expmae-finetune and pretrain --help

            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ValueError
            return tuple(coerce(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        items = [v if item is Any else coerce(v, item) for v in value]
        return tuple(items) if origin is tuple else items
    return value


def strict_type(key: str, value: Any, tp: Any) -> Any:
    """``value`` as ``tp`` when it already is one (an int for a float, a list of numbers for a tuple of floats), for
    settings given from Python rather than as text; else a one-line ConfigError."""
    numbers = (int, float)
    ok = (isinstance(value, tp) and not (tp is int and isinstance(value, bool))) if tp in (bool, int, str) else \
        (isinstance(value, numbers) and not isinstance(value, bool)) if tp is float else \
        (isinstance(value, (list, tuple)) and all(isinstance(v, numbers) and not isinstance(v, bool) for v in value))
    if not ok:
        raise ConfigError(f"{key}={value!r} is not {type_name(tp)}")
    if tp is float:
        return float(value)
    return tuple(float(v) for v in value) if tp not in (bool, int, str) else value


def check(key: str, value: Any, meta: dict) -> None:
    """Range and choice checks from the field's metadata; ``None`` (keep default/preset) always passes."""
    if value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if "choices" in meta and v not in meta["choices"]:
            raise ConfigError(f"{key}={v!r} is not allowed; allowed values: {allowed(meta['choices'])}")
        bounds = []
        if "min" in meta:
            bounds.append((v >= meta["min"], f">= {meta['min']}"))
        if "gt" in meta:
            bounds.append((v > meta["gt"], f"> {meta['gt']}"))
        if "max" in meta:
            bounds.append((v <= meta["max"], f"<= {meta['max']}"))
        if "lt" in meta:
            bounds.append((v < meta["lt"], f"< {meta['lt']}"))
        if not all(ok for ok, _ in bounds):
            raise ConfigError(f"{key}={v!r} is out of range; expected a value {' and '.join(b for _, b in bounds)}")




def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a field: metadata ``flag``, else ``--name-with-dashes``, ``--no-name`` for a
    boolean that defaults to true."""
    if "flag" in f.metadata:
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.type in (bool, "bool") and f.default is True else f"--{name}"


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> dict[str, str]:
    """One flag per field of dataclass ``cls`` (but ``skip``), its help the field's help plus its default, in the
    field's ``group``; every flag defaults to None, so only flags given on the command line override a config file.
    Returns {flag: field name}. A boolean is a switch towards the value its default is not."""
    groups: dict[str, Any] = {}
    flags = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta, tp = f.metadata, hints[f.name]
        title = meta.get("group")
        target = groups.setdefault(title, parser.add_argument_group(title)) if title else parser
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = dict(dest=f.name, default=None, help=_help(meta.get("help", ""), default, tp))
        if tp is bool:
            kwargs.update(action="store_const", const=not default)
        else:
            kwargs.update(type=meta.get("parse", _arg_type(tp)), choices=meta.get("choices"),
                          metavar=meta.get("metavar"))
            if typing.get_origin(tp) is list:
                kwargs["nargs"] = "+"
        target.add_argument(flag_of(f), *meta.get("aliases", ()), **kwargs)
        flags[flag_of(f)] = f.name
    return flags


def _arg_type(tp: Any) -> Callable[[str], Any]:
    inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
    return inner if inner in (int, float, str) else str


def _help(text: str, default: Any, tp: Any) -> str:
    text = text.replace("%", "%%")  # argparse formats help with %
    if tp is bool or default in ("", [], None):
        return text
    return f"{text} (default: {default})" if text else f"default: {default}"


def given(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that the command line set (flags from :func:`add_arguments` default to None)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(namespace).items() if k in names and v is not None}
