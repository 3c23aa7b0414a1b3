"""Settings tables: each one a frozen dataclass whose fields declare key, type, default and check.

One mechanism validates every table of the pipeline config, ``[bus]`` and ``[security]`` here in
``common`` and each service's table where the service is defined. A field is declared once, with
:func:`setting`::

    @dataclass(frozen=True)
    class PlaybackSettings:
        target_ms: float = setting(6.0, non_negative)

Its annotation is its type (``int``, ``float``, ``str``, ``bool``, or a union of them), its default
is the one default there is (``config/pipeline.toml`` shows it commented out, and a test holds
the file to the code), and ``check(value)`` returns ``None`` when the value is fine or the
reason it is not. A class may also define ``problems(self)``, yielding ``(key, why)`` for checks
across keys. :func:`parse_table` reports every mistake as one line naming where the value came
from, the dotted key, and why.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Union

Check = Callable[[Any], "str | None"]

__all__ = ["setting", "parse_table", "fields_of", "positive", "non_negative", "at_least", "one_of",
           "parsed_by", "kind_of", "describe_value", "SettingsError"]


class SettingsError(ValueError):
    """One bad key: ``key`` names it, ``why`` says what is wrong (the caller adds where it came from)."""

    def __init__(self, key: str, why: str):
        super().__init__(f"{key}: {why}")
        self.key, self.why = key, why


def setting(default: Any, check: Check | None = None) -> Any:
    """A settings field: its ``default`` and an optional ``check(value) -> reason | None``."""
    return dataclasses.field(default=default, metadata={"check": check})


# --------------------------------------------------------------------------- checks
def positive(v) -> str | None:
    """Check: a finite number > 0."""
    return None if v > 0 and math.isfinite(v) else "must be positive"


def non_negative(v) -> str | None:
    """Check: a finite number >= 0."""
    return None if v >= 0 and math.isfinite(v) else "must be >= 0"


def at_least(low: int) -> Check:
    """Check: a number >= ``low``."""
    return lambda v: None if v >= low else f"must be >= {low}"


def one_of(*choices: str) -> Check:
    """Check: one of ``choices``."""
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def parsed_by(parse: Callable[[Any], Any], *errors: type[Exception]) -> Check:
    """Check: ``parse(value)`` succeeds; the message of one of its ``errors`` is the problem."""
    def check(v: Any) -> str | None:
        try:
            parse(v)
        except errors as exc:
            return str(exc)
        return None
    return check


# --------------------------------------------------------------------------- parsing
def kind_of(v: Any) -> str:
    """How a TOML value's kind is named in messages ("an integer", "a table", ...)."""
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "an array"
    return "a date/time"


def describe_value(v: Any) -> str:
    """A value as messages show it: its kind, then the value as TOML spells it (true, not True)."""
    shown = ("true" if v else "false") if isinstance(v, bool) else repr(v)
    return f"{kind_of(v)} {shown}"


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}


@cache
def fields_of(cls: type) -> tuple[tuple[str, tuple[type, ...], Any, Check | None], ...]:
    """``(key, accepted types, default, check)`` for each field of the settings class ``cls``."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        kinds = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
        out.append((f.name, tuple(kinds), f.default, f.metadata.get("check")))
    return tuple(out)


def _converted(key: str, value: Any, kinds: tuple[type, ...], check: Check | None) -> Any:
    if float in kinds and type(value) is int:
        value = float(value)  # TOML's 3 for a float setting means 3.0
    if Path in kinds and type(value) is str:
        if not value:
            raise SettingsError(key, "must be a path, got an empty string")
        value = Path(value).expanduser()
    if not any(type(value) is k or (k is Path and isinstance(value, Path)) for k in kinds):
        names = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
        raise SettingsError(key, f"must be {names}, got {describe_value(value)}")
    reason = check(value) if check else None
    if reason:
        raise SettingsError(key, f"{reason}, got {describe_value(value)}")
    return value


def parse_table(cls: type, raw: Mapping[str, Any]) -> Any:
    """An instance of the settings class ``cls`` from the table ``raw`` (keys left out: defaults).

    Raises :class:`SettingsError` for the first unknown key, wrong type (a bool is never a
    number) or failed check, then for the first of the instance's ``problems()``.
    """
    fields = fields_of(cls)
    known = [name for name, *_ in fields]
    for key in raw:
        if key not in known:
            raise SettingsError(key, f"unknown key (known: {', '.join(sorted(known))})")
    values = {name: _converted(name, raw[name], kinds, check) if name in raw else default
              for name, kinds, default, check in fields}
    obj = cls(**values)
    for key, why in _problems(obj):
        raise SettingsError(key, why)
    return obj


def _problems(obj: Any) -> Iterator[tuple[str, str]]:
    problems = getattr(obj, "problems", None)
    return iter(problems()) if problems is not None else iter(())
