"""Typed dataclass trees from YAML plus ``key.sub=value`` overrides, with errors that name the key.

Every section of the config is a dataclass; this module knows nothing about PAPO. Values are checked
against the field annotations (int, float, bool, str, Literal, Optional, list/tuple, nested dataclasses)
and a dataclass's own ``__post_init__`` validation runs as it is built.

``Literal`` fields are checked in one place, ``check_choice``: on load here, and by every config section's
``__post_init__`` through ``check_choices``, so a section built directly (``AlgorithmConfig(name="ppo")``)
refuses a bad value with the same message as a YAML file or override does.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config tree."""


def literal_choices(tp: Any) -> tuple | None:
    """The values a ``Literal[...]`` annotation allows (``None`` among them for ``Literal[...] | None``);
    None when ``tp`` is not such an annotation."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return typing.get_args(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and all(
        typing.get_origin(a) is typing.Literal or a is type(None) for a in args
    ):
        return tuple(v for a in args for v in (typing.get_args(a) if a is not type(None) else (None,)))
    return None


def check_choice(value: Any, tp: Any, where: str) -> None:
    """Raise ``ConfigError`` (a ``ValueError``) naming ``where`` when ``tp`` is a ``Literal`` annotation
    (possibly optional) that does not allow ``value``."""
    choices = literal_choices(tp)
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")


def check_choices(section: Any, name: str) -> None:
    """Check every ``Literal`` field of the dataclass instance ``section`` (``check_choice``); ``name``
    prefixes the field names in the error (``algorithm`` -> ``algorithm.kl_prc_estimator``)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        check_choice(getattr(section, f.name), hints[f.name], f"{name}.{f.name}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if literal_choices(tp) is not None:  # Literal[...], Literal[...] | None
        check_choice(value, tp, where)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads exponents without a dot ("1e-5") as strings
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys and ill-typed values raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys of "
            f"{where or 'the top level'}: {sorted(fields)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config tree as plain YAML-able data (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the nested dict ``data`` in place."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    *parents, leaf = key.strip().split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {p!r} is not a section")
    node[leaf] = yaml.safe_load(raw)


def load_config(cls: type[T], path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load ``cls`` from a YAML file (optional) and apply overrides; errors name the file and the key."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    for o in overrides:
        apply_override(data, o)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from e
