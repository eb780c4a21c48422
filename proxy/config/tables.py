"""Reading one TOML table with types checked: every problem is kept as `key: reason`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

MISSING = object()


class TableReader:
    """Takes keys out of one TOML table, type-checking each, and remembers every problem."""

    def __init__(self, table: Any, key: str, errors: list[str]) -> None:
        self.key = key
        self.errors = errors
        if not isinstance(table, dict):
            self.error(f"must be a table, not {kind_of(table)}")
            table = {}
        self.table: dict[str, Any] = dict(table)

    def error(self, reason: str, sub: str | None = None) -> None:
        where = f"{self.key}.{sub}" if sub else self.key
        self.errors.append(f"{where}: {reason}")

    def get(self, name: str, kind: str, default: Any = MISSING) -> Any:
        if name not in self.table:
            if default is MISSING:
                self.error("is required", name)
            return None if default is MISSING else default
        value = self.table.pop(name)
        if not is_kind(value, kind):
            self.error(f"must be {kind}, not {kind_of(value)} {value!r}", name)
            return None if default is MISSING else default
        return float(value) if kind == "a number" else value

    def table_of(self, name: str) -> Any:
        return self.table.pop(name, None)

    def done(self) -> None:
        for extra in self.table:
            self.error("unknown key", extra)


def kind_of(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def is_kind(value: Any, kind: str) -> bool:
    if kind == "an integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "a number":
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        try:  # TOML integers have no size limit: one past a float's range is not a number here
            return math.isfinite(value)
        except OverflowError:
            return False
    if kind == "a string":
        return isinstance(value, str)
    if kind == "a boolean":
        return isinstance(value, bool)
    if kind == "an array":
        return isinstance(value, list)
    if kind == "a table":
        return isinstance(value, dict)
    raise AssertionError(kind)


def port_key(r: TableReader, name: str, default: int) -> int:
    port: int = r.get(name, "an integer", default)
    if not 0 <= port <= 65535:
        r.error(f"must be a port number 0..65535, not {port}", name)
    return port


def positive_key(
    r: TableReader, name: str, kind: str, default: Any, *, allow_zero: bool = False
) -> Any:
    value = r.get(name, kind, default)
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        r.error(f"must be {'>= 0' if allow_zero else '> 0'}, not {value}", name)
    return value


def field_default(cls: type[Any], name: str) -> Any:
    """The default of dataclass `cls`'s field `name`: a parser reads a missing key's default here,
    so it is written once, on the dataclass (for classes whose every field has one, `Cls()` does)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise TypeError(f"{cls.__name__}.{name} has no default")
    raise TypeError(f"{cls.__name__} has no field {name}")
