"""Plain data (parsed YAML) into typed dataclasses, with one-line errors naming the key.

:func:`build` walks a dataclass's fields and type hints: unknown keys are
rejected with the closest valid key suggested (``difflib``), values are
checked against ``bool``/``int``/``float``/``str``, ``Literal``, unions,
``list[...]``, ``dict`` and nested dataclasses. :func:`parse_yaml` reads YAML with 1.2
booleans and floats (``no`` stays a string, ``1e-3`` is a number).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal

import yaml

from .errors import ConfigError

__all__ = ["ConfigError", "build", "convert", "describe", "fields_of", "kind", "parse_yaml", "suggest"]


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and floats: ``save_strategy: no`` stays "no", ``1e-3`` is a number."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+|[0-9]*\.[0-9]+[eE][-+]?[0-9]+)"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 booleans and floats (yes/no/on/off are strings; 1e-3 is a float)."""
    return yaml.load(text, Loader=_Loader)


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def describe(tp: Any) -> str:
    """Words for a type annotation, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is list:
        return f"a list of ({describe(args[0])})" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return words.get(tp, getattr(tp, "__name__", str(tp)))


def kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def convert(value: Any, tp: Any, key: str, *, required: typing.Collection[str] = ()) -> Any:
    """Check ``value`` against annotation ``tp`` and return it converted (ints to floats, dicts to dataclasses).

    Types that are not plain data (enums, classes) are accepted unchecked.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, required=required)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return convert(value, arm, key, required=required)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {describe(tp)}, got {value!r} ({kind(value)})")
    if origin is Literal:
        if value in args:
            return value
        hint = suggest(value, [str(a) for a in args]) if isinstance(value, str) else ""
        raise ConfigError(f"{key}: {value!r} is not {describe(tp)}{hint}")
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {describe(tp)}, got {value!r} ({kind(value)})")
        return [convert(v, args[0], f"{key}[{i}]", required=required) if args else v for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} ({kind(value)})")
        return {str(k): v for k, v in value.items()}
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    if tp in (bool, int, float, str):
        raise ConfigError(f"{key}: expected {describe(tp)}, got {value!r} ({kind(value)})")
    return value


def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of dataclass ``cls`` by name."""
    return {f.name: f for f in dataclasses.fields(cls)}


def build(cls: type, raw: Any, key: str = "", *, required: typing.Collection[str] = ()) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    ``required``: dotted keys that must be present and non-empty.
    """
    where = key or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {raw!r} ({kind(raw)})")
    fields, hints = fields_of(cls), typing.get_type_hints(cls)
    prefix = f"{key}." if key else ""
    for name in raw:
        if name not in fields:
            valid = ", ".join(fields)
            raise ConfigError(f"unknown key '{prefix}{name}'{suggest(str(name), fields)} (valid keys here: {valid})")
    values = {name: convert(raw[name], hints[name], prefix + name, required=required) for name in raw}
    for name in fields:
        if prefix + name in required and raw.get(name) in (None, ""):
            raise ConfigError(f"missing required key '{prefix}{name}'")
    try:
        return cls(**values)
    except ValueError as exc:  # a dataclass that validates itself names the field first (amad.options)
        raise ConfigError(f"{prefix}{exc}") from None
