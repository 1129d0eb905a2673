"""Config machinery: typed dataclass configs built from defaults, a preset, a YAML file and `key=value` overrides.

Order of precedence (later wins): dataclass defaults < `base` (a dict or a dataclass, e.g. a preset) < the YAML
file < command-line overrides (`model.hidden=256`, `train.lr=3e-5`, `flag=true`, `sizes=[1,2]`).

Decisions:
- Sources are merged as plain nested dicts first, then the dataclasses are built once, children before
  parents, through their constructors, so each class's own `__post_init__` validation runs on the final values.
- Values are checked against the field's annotation (resolved with `typing.get_type_hints`, so
  `from __future__ import annotations` works; config classes must live at module level for that):
  int, float (ints accepted; strings like "3e-5" accepted because PyYAML reads `3e-5` as a string),
  bool, str, None, Optional/Union, Literal, tuple/list (of scalars), dict, nested dataclasses.
  No silent conversions beyond those: `hidden: 12.5` or `flag: 1` is an error.
- An override value is parsed with `yaml.safe_load`; if that value does not fit the field but the raw text
  does (a str field given `name=123` or `date=2024-01-01`), the raw text is used.
- Every error is a `ValueError` naming the dotted key and what was expected; an unknown key lists the valid
  keys at its level and the closest match. A missing YAML file raises `ConfigFileNotFoundError`, which is
  both a ValueError and a FileNotFoundError.
- `init=False` fields are not configurable and are left out of dicts.
- Validation helpers (`check`, `require_positive`, `require_min`, `require_range`, `require_in`) keep
  `__post_init__` at one line per rule: `require_min("train.group_size", self.group_size, 2)` raises
  "train.group_size must be >= 2, got 1".
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

__all__ = ["ConfigFileNotFoundError", "CONFIG_DIR", "resolve_config_path", "load_config", "config_from_dict", "config_to_dict",
           "check", "require_positive", "require_min", "require_range", "require_in"]


class ConfigFileNotFoundError(FileNotFoundError, ValueError):
    """A config file that does not exist (catchable as ValueError or FileNotFoundError)."""


CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
"""the bundled configs (unigrpo/configs/NAME.yaml)"""


def resolve_config_path(name: str | None) -> str | None:
    """`name` itself when it is an existing file (or None), else the bundled config unigrpo/configs/NAME.yaml;
    a ValueError listing the bundled names when it is neither."""
    if name is None or os.path.exists(name):
        return name
    bundled = os.path.join(CONFIG_DIR, f"{name}.yaml")
    if os.path.exists(bundled):
        return bundled
    avail = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    raise ValueError(f"config {name!r} is neither a file nor a bundled config; bundled: {avail}")


# ---------------------------------------------------------------------------------------------------------
# validation helpers for __post_init__


def check(cond: bool, msg: str) -> None:
    """Raise ValueError(msg) unless cond."""
    if not cond:
        raise ValueError(msg)


def require_positive(name: str, value: float) -> None:
    """`name` must be > 0."""
    check(value > 0, f"{name} must be > 0, got {value!r}")


def require_min(name: str, value: float, minimum: float) -> None:
    """`name` must be >= minimum."""
    check(value >= minimum, f"{name} must be >= {minimum}, got {value!r}")


def require_range(name: str, value: float, lo: float, hi: float) -> None:
    """`name` must lie in the closed interval [lo, hi]."""
    check(lo <= value <= hi, f"{name} must be in [{lo}, {hi}], got {value!r}")


def require_in(name: str, value: Any, choices: Sequence[Any]) -> None:
    """`name` must be one of `choices`."""
    check(value in choices, f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


# ---------------------------------------------------------------------------------------------------------
# building


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                base: Mapping | Any | None = None) -> T:
    """Build `cls` from its defaults, then `base`, then the YAML file at `path`, then `key=value` overrides."""
    tree: dict = {}
    if base is not None:
        _merge(tree, _as_mapping(_plain(base), "base"))  # dataclass instances, also nested, become dicts
    if path is not None:
        _merge(tree, _read_yaml(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"malformed override {item!r}: expected key=value, e.g. train.lr=3e-5")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        *parents, leaf = key.split(".")
        node = tree
        for i, part in enumerate(parents):
            child = node.get(part)
            if not isinstance(child, dict):
                if child is not None:
                    raise ValueError(f"override {item!r}: {'.'.join(parents[:i + 1])} is not a mapping")
                child = node[part] = {}
            node = child
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            _merge(node[leaf], value)
        else:
            node[leaf] = value if isinstance(value, dict) else _Override(text.strip(), value)
    return config_from_dict(cls, tree)


def config_from_dict(cls: type[T], d: Mapping) -> T:
    """Build `cls` strictly from a nested dict (unknown keys and wrong types are errors)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return _build(cls, _as_mapping(d, cls.__name__), "", None)


def config_to_dict(cfg: Any) -> dict:
    """A plain nested dict of a dataclass config (tuples become lists), safe for yaml.safe_dump / json."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


# ---------------------------------------------------------------------------------------------------------
# internals


class _Override(typing.NamedTuple):
    """A command-line value: its raw text and its YAML parse."""
    text: str
    value: Any


def _read_yaml(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigFileNotFoundError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _as_mapping(d: Any, what: str) -> dict:
    if not isinstance(d, Mapping):
        raise ValueError(f"{what}: expected a mapping, got {d!r}")
    return dict(d)


def _merge(dst: dict, src: Mapping) -> None:
    """Recursive dict update: nested mappings merge, everything else replaces."""
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = dict(v) if isinstance(v, Mapping) else v


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return config_to_dict(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _build(cls: type, d: dict, prefix: str, defaults: Any) -> Any:
    """Instantiate dataclass `cls` from dict `d`; missing fields come from `defaults` (an instance) or the
    class defaults. `prefix` is the dotted path of `cls` for error messages ("" or "model.")."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in d if k not in fields]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
        raise ValueError(f"unknown key {prefix + key!r}; valid keys{' under ' + prefix[:-1] if prefix else ''}: "
                         f"{', '.join(fields)}{hint}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        default = getattr(defaults, name) if defaults is not None else _field_default(f)
        if name in d:
            kwargs[name] = _coerce(d[name], hints.get(name, Any), prefix + name, default)
        elif default is not dataclasses.MISSING:
            kwargs[name] = default
        else:
            raise ValueError(f"missing required key {prefix + name!r}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str, default: Any = dataclasses.MISSING) -> Any:
    """Check / convert one value against annotation `tp`; an _Override falls back to its raw text."""
    if isinstance(value, _Override):
        try:
            return _coerce(value.value, tp, key, default)
        except ValueError as err:
            if value.text != value.value:
                try:
                    return _coerce(value.text, tp, key, default)
                except ValueError:
                    pass
            raise err from None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        nested_default = default if isinstance(default, tp) else None
        return _build(tp, dict(value), key + ".", nested_default)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, default)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return value
        raise ValueError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if tp is type(None) or tp is None:
        if value is None:
            return None
        raise ValueError(f"{key}: expected None, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}: expected str, got {value!r}")
    if tp in (list, tuple) or origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list for {_type_name(tp)}, got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ValueError(f"{key}: expected {len(args)} items for {_type_name(tp)}, got {value!r}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            elem = args[0] if args else Any
            items = [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return list(items) if (tp is list or origin is list) else tuple(items)
    if tp is dict or origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, f"{key} key"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value  # an annotation we do not check (e.g. a TypeVar)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")
