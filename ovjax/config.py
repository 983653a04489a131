"""The one config loader of every verb that takes a config: `--config FILE.py:ARG` plus typed overrides.

    cfg = config.load("configs/stage1.py:tiny", ["--config.train.steps=7", "--config.optim.lr", "0.5"])

`FILE.py:ARG` loads FILE (a path, or one relative to the repository) and calls `get_config(ARG)` (or
`get_config()` without `:ARG`); it must return a ConfigDict. Each `--config.a.b=value` (or `--config.a.b
value`) then sets ONE EXISTING field, cast to the type of its current value: ints, floats, bools
(true/false/yes/no/1/0), strings, tuples (`a,b` or `(a, b)`), and any literal (or None) where the field is
None. An unknown key or a section is an error that names the keys valid there, on one line. The result is
frozen (`ml_collections.FrozenConfigDict`): nothing reads a config that can still change under it. A value
derived later (e.g. data made up front) becomes a new frozen config via `with_values`, never an edit.

Why not ml_collections' `config_flags`: measured against it (ml_collections 1.1, per-verb FlagValues) it
  - turns `--config.optim.trainable=merger,visual` into the ONE-element tuple ('merger,visual') silently;
  - cannot override a field whose value is None (`--config.optim.groups.visual=1e-5`, a per-group peak lr,
    fails with "Type NoneType ... is not supported for overriding");
  - answers an unknown key with "Did you mean ...?" only, not the keys valid at that level;
  - resolves a relative FILE against the working directory only (ours also tries the repository root).
The parser below is small (cast per current type) and does those four right.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

REPO = Path(__file__).resolve().parents[1]
PREFIX = "--config."


class ConfigError(ValueError):
    """A config file, argument or override that cannot be used."""


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(the other args, [(dotted key, value text)]) from `--config.a.b=v` / `--config.a.b v` in argv."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(PREFIX):
            body = arg[len(PREFIX):]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(argv):
                key, value = body, argv[i + 1]
                i += 1
            else:
                raise ConfigError(f"{arg} needs a value")
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def load(spec: str, overrides: Sequence[str] | Sequence[tuple[str, Any]] = ()) -> ml_collections.FrozenConfigDict:
    """`FILE.py[:ARG]` + overrides (argv strings, or (dotted key, value) pairs; a str value is cast to the
    field's type, any other value is set as it is) -> the frozen config."""
    path, _, arg = spec.partition(":")
    module = _load_module(path)
    cfg = module.get_config(arg) if arg else module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return a ConfigDict, got {type(cfg).__name__}")
    pairs = list(overrides)
    if pairs and isinstance(pairs[0], str):
        rest, pairs = split_overrides(pairs)
        if rest:
            raise ConfigError(f"not config overrides: {rest}")
    for key, value in pairs:
        apply_override(cfg, key, value)
    return freeze(cfg)


def with_values(cfg: ml_collections.ConfigDict, values: Mapping[str, Any]) -> ml_collections.FrozenConfigDict:
    """A frozen copy of `cfg` with some existing fields set ({dotted key: value}); `cfg` is not changed."""
    out = cfg.as_configdict() if isinstance(cfg, ml_collections.FrozenConfigDict) else cfg.copy_and_resolve_references()
    for key, value in values.items():
        apply_override(out, key, value)
    return freeze(out)


def freeze(cfg: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
    return cfg if isinstance(cfg, ml_collections.FrozenConfigDict) else ml_collections.FrozenConfigDict(cfg)


def apply_override(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Set the existing field `cfg.<key>` (dotted); a str value is cast to the field's type."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"--config.{key}: no section {part!r} at {_where(parts[:i])}; "
                              f"keys there: {_keys(node)}")
        node = node[part]
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(f"--config.{key}: unknown key {leaf!r}; keys at {_where(parts[:-1])}: {_keys(node)}")
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key} is a section; set one of its keys: {_keys(current)}")
    if isinstance(value, str):
        value = _cast(value, current, key)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--config.{key}={value!r}: {e}") from e


def _where(parts: list[str]) -> str:
    return ".".join(parts) or "the top level"


def _keys(node) -> list[str]:
    return sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []


def _load_module(path: str):
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (REPO / p).exists():
        p = REPO / p  # `configs/stage1.py` works from any working directory
    if not p.is_file():
        raise ConfigError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"_ovjax_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{p} has no get_config(arg)")
    return module


def _cast(text: str, current: Any, key: str):
    """The override string `text` as the type of the field's current value."""
    def literal():
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    if current is None:
        return None if text in ("None", "none", "null") else literal()
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected a bool (true/false), got {text!r}")
    for kind, name in ((int, "an int"), (float, "a float")):
        if isinstance(current, kind):
            try:
                return kind(text)
            except ValueError:
                raise ConfigError(f"--config.{key}: expected {name}, got {text!r}") from None
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        v = literal()
        if isinstance(v, (tuple, list)):
            return type(current)(v)
        if text.strip() == "":
            return type(current)()
        return type(current)(s.strip() for s in text.split(","))
    raise ConfigError(f"--config.{key}: cannot override a field of type {type(current).__name__}")
