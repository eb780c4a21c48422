"""Figures: the runs of one configuration under one load, their medians and paired ratios."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Figure:
    """One row of the table: runs of one configuration under one kind of load."""

    name: str
    load: str  # "c64", "c1" or "open"
    runs: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        values = [r[key] for r in self.runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    def by_round(self, key: str) -> dict[int, float]:
        return {r["round"]: r[key] for r in self.runs if r.get(key) is not None and "round" in r}

    def total(self, key: str) -> int:
        return sum(int(r.get(key) or 0) for r in self.runs)

    def errors(self) -> int:
        return self.total("socket_errors") + self.total("errors")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "load": self.load,
            "rps": self.median("rps" if self.load != "open" else "achieved_rps"),
            "p50_ms": self.median("p50_ms"),
            "p99_ms": self.median("p99_ms"),
            "non_2xx": self.total("non_2xx"),
            "errors": self.errors(),
            "runs": self.runs,
        }


def paired_ratio(a: Figure | None, b: Figure | None, key: str) -> tuple[float | None, list[float]]:
    """Median of a/b over the rounds both were measured in (side by side), and each round's a/b."""
    if a is None or b is None:
        return None, []
    x, y = a.by_round(key), b.by_round(key)
    ratios = [x[i] / y[i] for i in sorted(x) if y.get(i)]
    return (statistics.median(ratios) if ratios else None), ratios
