"""Floors as data: each a bound on a ratio (or a difference) of two figures, judged by judge()."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from harness.figures import Figure, paired_ratio


class Kind(StrEnum):
    """How a floor compares its numerator with its denominator."""

    RATIO_AT_LEAST = "ratio_at_least"  # median of the per-round ratios >= bound
    RATIO_AT_MOST = "ratio_at_most"  # median of the per-round ratios <= bound
    EXCESS_AT_MOST = "excess_at_most"  # median numerator - median denominator <= bound


@dataclass(frozen=True, slots=True)
class Measure:
    """One figure's metric: a configuration, its load ("c64", "c1", "open") and a run key."""

    config: str
    load: str
    key: str  # "rps" or "p50_ms", ...

    def of(self, by: dict[tuple[str, str], Figure]) -> Figure | None:
        return by.get((self.config, self.load))


@dataclass(frozen=True, slots=True)
class Floor:
    """A row of the floors table. `title` may hold "{bound}", filled in from `bound`."""

    title: str
    numerator: Measure
    denominator: Measure
    bound: float
    kind: Kind

    @property
    def name(self) -> str:
        return self.title.format(bound=self.bound)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "numerator": [self.numerator.config, self.numerator.load, self.numerator.key],
            "denominator": [self.denominator.config, self.denominator.load, self.denominator.key],
            "bound": self.bound,
            "kind": str(self.kind),
        }


@dataclass(frozen=True, slots=True)
class Check:
    """A verdict: True (PASS), False (FAIL) or None (could not be measured)."""

    name: str
    ok: bool | None
    detail: str

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "N/A "}[self.ok]
        return (
            f"- {verdict} {self.name}: {self.detail}" if self.detail else f"- {verdict} {self.name}"
        )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "pass": self.ok, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Comparison:
    """numerator/denominator measured side by side: the median of the per-round ratios."""

    numerator: Measure
    denominator: Measure
    ratio: float
    rounds: list[float]
    numerator_median: float
    denominator_median: float

    def medians(self) -> str:
        x, y = self.numerator_median, self.denominator_median
        if self.numerator.key == "rps":
            return f"medians {x:,.0f} / {y:,.0f} req/s = {x / y:.2f}x"
        return f"medians {x:.3f} / {y:.3f} ms"

    def rounds_text(self) -> str:
        return ", ".join(f"{v:.2f}" for v in self.rounds)

    def to_json(self) -> dict[str, Any]:
        return {
            "numerator": [self.numerator.config, self.numerator.load, self.numerator.key],
            "denominator": [self.denominator.config, self.denominator.load, self.denominator.key],
            "ratio": self.ratio,
            "rounds": self.rounds,
            "numerator_median": self.numerator_median,
            "denominator_median": self.denominator_median,
        }


def compare(
    numerator: Measure, denominator: Measure, by: dict[tuple[str, str], Figure]
) -> Comparison | None:
    """The paired ratio of two measures, or None if either was not measured."""
    fa, fb = numerator.of(by), denominator.of(by)
    ratio, rounds = paired_ratio(fa, fb, numerator.key)
    x = fa.median(numerator.key) if fa else None
    y = fb.median(denominator.key) if fb else None
    if ratio is None or x is None or y is None:
        return None
    return Comparison(numerator, denominator, ratio, rounds, x, y)


def judge(floor: Floor, figures: list[Figure], prefixes: dict[str, str] | None = None) -> Check:
    """The one judge of every floor. `prefixes` put a load's context (such as the open-loop
    rate) before the detail, e.g. {"open": "at 6,875 req/s, "}."""
    by = {(f.name, f.load): f for f in figures}
    num, den = floor.numerator, floor.denominator
    prefix = (prefixes or {}).get(num.load, "")
    if floor.kind is Kind.EXCESS_AT_MOST:
        fa, fb = num.of(by), den.of(by)
        x = fa.median(num.key) if fa else None
        y = fb.median(den.key) if fb else None
        if x is None or y is None:
            return Check(floor.name, None, "not measured")
        detail = (
            f"{num.config} {x:.3f} ms vs {den.config} {y:.3f} ms: +{x - y:.3f} ms"
            f" (ceiling +{floor.bound:.3f} ms)"
        )
        return Check(floor.name, x <= y + floor.bound, prefix + detail)
    c = compare(num, den, by)
    if c is None:
        return Check(floor.name, None, "not measured")
    at_least = floor.kind is Kind.RATIO_AT_LEAST
    word = "floor" if at_least else "ceiling"
    detail = (
        f"{num.config}/{den.config} side by side: median {c.ratio:.2f}x of rounds"
        f" [{c.rounds_text()}] ({word} {floor.bound:.2f}x); {c.medians()}"
    )
    ok = c.ratio >= floor.bound if at_least else c.ratio <= floor.bound
    return Check(floor.name, ok, prefix + detail)


def clean_check(figures: list[Figure]) -> Check:
    """No measured run may have non-2xx answers or socket errors."""
    bad = [(f.name, f.load, f.total("non_2xx")) for f in figures if f.total("non_2xx")]
    errs = [(f.name, f.load, f.errors()) for f in figures if f.errors()]
    return Check(
        "no non-2xx answers and no socket errors in measured runs",
        not bad and not errs,
        "none" if not bad and not errs else f"non-2xx: {bad}; errors: {errs}",
    )


def judge_all(
    floors: tuple[Floor, ...], figures: list[Figure], prefixes: dict[str, str] | None = None
) -> list[Check]:
    """Every floor of the table, then the clean-runs check."""
    return [*(judge(f, figures, prefixes) for f in floors), clean_check(figures)]
