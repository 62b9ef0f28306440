"""Checking values read from YAML against the type hints of the config dataclasses they fill.

A benchmark YAML (:func:`stinfer.evaluate.benchmark.load_config`) is read into dataclasses;
these functions check every value where it enters, before any cell runs, and name the file
and the key path in the message, e.g.
``benchmarks/x.yaml: cohorts[0].slides: expected a list, got 'A1'``. The dataclasses' own
``__post_init__`` checks (ranges, choices) still run when the object is built.

The types understood are those the configs use: ``bool``, ``int``, ``float`` (an integer is
accepted and converted), ``str``, ``list[X]``, ``tuple[X, ...]`` and fixed tuples (a YAML list
becomes a tuple), ``dict[str, X]``, ``X | None``, nested config dataclasses (a mapping) and
``Any``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from stinfer.errors import InputError

__all__ = ["checked_dataclass", "checked_value", "describe_type", "unknown_keys_message"]


def unknown_keys_message(unknown: Iterable[str], known: Iterable[str], what: str = "keys") -> str:
    """``unknown keys ['n_gene'] (did you mean 'n_genes'?); valid keys: [...]``."""
    unknown, known = sorted(map(str, unknown)), sorted(map(str, known))
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            hints.append(f"{key!r} -> {close[0]!r}" if len(unknown) > 1 else repr(close[0]))
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    return f"unknown {what} {unknown}{hint}; valid keys: {known}"


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


def describe_type(annotation: Any) -> str:
    """Plain words for a type hint: ``list[str]`` -> ``a list of strings``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return "any value"
    if _is_union(origin):
        options = [describe_type(arg) for arg in args if arg is not type(None)]
        text = " or ".join(options)
        return f"{text} or null" if type(None) in args else text
    if dataclasses.is_dataclass(annotation):
        return f"a mapping of {annotation.__name__} fields"
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if annotation in simple:
        return simple[annotation]
    plural = {
        bool: "booleans",
        int: "integers",
        float: "numbers",
        str: "strings",
    }
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {plural.get(args[0], 'values')}"
        item = args[0] if args else Any
        return "a list" if item is Any else f"a list of {plural.get(item, describe_type(item))}"
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def checked_value(value: Any, annotation: Any, where: str) -> Any:
    """``value`` checked against ``annotation`` (converted: list -> tuple, int -> float).

    Raises :class:`InputError` ``"{where}: expected {words}, got {value!r}"``.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)

    def refuse() -> InputError:
        return InputError(f"{where}: expected {describe_type(annotation)}, got {value!r}.")

    if annotation is Any:
        return value
    if _is_union(origin):
        if value is None and type(None) in args:
            return None
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return checked_value(value, option, where)
            except InputError as error:
                if len(args) - (type(None) in args) == 1:
                    raise error from None  # one real option: its own (deeper) message
        raise refuse()
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            raise refuse()
        return checked_dataclass(annotation, value, where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise refuse()
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise refuse()
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refuse()
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise refuse()
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise refuse()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise refuse()
            items = args
        else:
            items = [args[0] if args else Any] * len(value)
        checked = [
            checked_value(item, kind, f"{where}[{index}]")
            for index, (item, kind) in enumerate(zip(value, items, strict=True))
        ]
        return tuple(checked) if origin is tuple else checked
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise refuse()
        key_type, item_type = args if len(args) == 2 else (Any, Any)
        return {
            checked_value(key, key_type, f"{where} (key {key!r})"): checked_value(
                item, item_type, f"{where}.{key}"
            )
            for key, item in value.items()
        }
    return value


def checked_dataclass(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    """``cls(**values)`` after checking the keys and the type of every value.

    ``where`` is the file and key path of the mapping (``"x.yaml: cohorts[0].genes"``); an
    unknown key (with the closest valid one), a value of the wrong type, or a value the
    dataclass refuses is an :class:`InputError` naming it.
    """
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise InputError(f"{where}: expected a mapping of {cls.__name__} fields, got {values!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, values)) - set(fields))
    if unknown:
        raise InputError(f"{where}: {unknown_keys_message(unknown, fields)}.")
    missing = [
        name
        for name, spec in fields.items()
        if name not in values
        and spec.default is dataclasses.MISSING
        and spec.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise InputError(f"{where}: missing keys {missing}.")
    hints = typing.get_type_hints(cls)
    checked = {
        key: checked_value(value, hints.get(key, Any), f"{where}.{key}")
        for key, value in values.items()
    }
    try:
        return cls(**checked)
    except InputError as error:
        raise InputError(f"{where}: {error}") from error
    except (TypeError, ValueError) as error:
        raise InputError(f"{where}: {error}") from error
