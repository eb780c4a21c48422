"""Feedback bodies, `{"id": <request id>, "label": <truth>}`, checked against what the model
answers: one of its classes (a classifier), or a finite number (a regressor)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from proxy.errors import InvalidInputError

Array = np.ndarray[Any, Any]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SHOWN = 60  # characters of a bad value quoted in a message
SHOWN_CLASSES = 20


@dataclass(frozen=True, slots=True)
class Classes:
    """A classifier's truth: one of `classes`; None when no manifest lists them (then any
    integer an int64 holds)."""

    model: str
    classes: tuple[int, ...] | None = None

    def describe(self, *, integer: bool = False) -> str:
        if self.classes is None:
            return "an integer class"
        shown = ", ".join(map(str, self.classes[:SHOWN_CLASSES]))
        more = f", ... {len(self.classes)} in all" if len(self.classes) > SHOWN_CLASSES else ""
        kind = "an integer class" if integer else "a class"
        return f"{kind} of {self.model} (classes: {shown}{more})"


@dataclass(frozen=True, slots=True)
class Values:
    """A regressor's truth: a finite number."""

    model: str

    def describe(self) -> str:
        return f"a finite number ({self.model} is a regression model)"


Truths = Classes | Values


@dataclass(frozen=True, slots=True)
class Feedback:
    """A checked feedback body: the id it refers to and the truth, one value per row (int64
    classes or float64 values)."""

    id: str
    truth: Array


def parse_feedback(doc: dict[str, Any], truths: Truths) -> Feedback:
    """Check a feedback document for a model whose truths are `truths`, or raise
    InvalidInputError naming the bad value and the rule it broke. The row count is the join's
    to check: only the stored prediction knows it."""
    rid = doc.get("id")
    if not isinstance(rid, str) or not rid:
        raise InvalidInputError(
            f'"id" must be the id (a non-empty string) of an earlier inference request, not {_show(rid)}'
        )
    if "label" in doc and "value" in doc:
        raise InvalidInputError('send the truth as "label" or as "value", not both')
    key = "label" if "label" in doc else "value"
    if key not in doc:
        raise InvalidInputError(
            '"label" is missing: the true class (or, for a regression model, the true'
            " value) of each row of that request"
        )
    return Feedback(rid, parse_truth(doc[key], truths, key=key))


def parse_truth(value: Any, truths: Truths, *, key: str = "label") -> Array:
    """One truth or a flat list of them, one per row, as an int64 (classes) or float64 array."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise InvalidInputError(f"{key} is an empty list; send one per row of that request")
    allowed = None
    if isinstance(truths, Classes) and truths.classes is not None:
        allowed = frozenset(truths.classes)
    out: list[int | float] = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        out.append(_one(item, truths, allowed, where))
    if isinstance(truths, Classes):
        return np.array(out, dtype=np.int64)
    return np.array(out, dtype=np.float64)


def _one(item: Any, truths: Truths, allowed: frozenset[int] | None, where: str) -> int | float:
    """One truth; `allowed`: the classes as a set (None: not known, or a regressor)."""
    kind = type(item)
    if kind is int:
        number: int | float = item
    elif kind is float:
        number = item
        if not math.isfinite(item):
            raise InvalidInputError(f"{where} {_show(item)} is not {truths.describe()}")
    else:
        shown = "" if item is None else f" {_show(item)}"
        raise InvalidInputError(f"{where}{shown} is {_what(item)}, not {truths.describe()}")
    if isinstance(truths, Values):
        try:
            return float(number)
        except OverflowError:  # an integer past float's range
            raise InvalidInputError(f"{where} {_show(item)} is not {truths.describe()}") from None
    if kind is float:
        if not item.is_integer():
            raise InvalidInputError(
                f"{where} {_show(item)} is a fraction, not {truths.describe(integer=True)}"
            )
        number = int(item)
    if allowed is not None:
        if number not in allowed:
            raise InvalidInputError(f"{where} {_show(item)} is not {truths.describe()}")
    elif not INT64_MIN <= number <= INT64_MAX:
        raise InvalidInputError(f"{where} {_show(item)} is outside the int64 range of a class")
    return number


def _what(item: Any) -> str:
    if isinstance(item, bool):
        return "a boolean"
    if isinstance(item, list):
        return "a nested list (send a flat list, one per row)"
    return {str: "a string", dict: "an object", type(None): "null"}.get(
        type(item), type(item).__name__
    )


def _show(item: Any) -> str:
    if isinstance(item, bool):
        return "true" if item else "false"
    if item is None:
        return "null"
    if isinstance(item, list | dict):  # its repr may be huge, or nested past repr's recursion
        return f"(a {type(item).__name__} of {len(item)})"
    try:
        text = repr(item)
    except ValueError:  # an integer past the 4,300 digits Python turns into a string
        return f"(an integer of {item.bit_length()} bits)"
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."
