"""Slices taken in turn: configurations alternate within a round, merged into one run each."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

PERCENTILES = ("p50_ms", "p75_ms", "p90_ms", "p99_ms")


def rotated(names: list[str], i: int) -> list[str]:
    """Round i's order: each configuration takes each place in turn, so none always runs first."""
    k = i % len(names)
    return names[k:] + names[:k]


def _merge_open_loop(slices: list[dict[str, Any]], out: dict[str, Any]) -> tuple[str, ...]:
    seconds = sum(float(r["duration_s"]) for r in slices)
    out["target_rps"] = slices[0]["target_rps"]
    out["achieved_rps"] = round(sum(int(r["measured"]) for r in slices) / seconds, 1)
    out["sustained"] = all(r["sustained"] for r in slices)
    for key in ("dispatch_lag_p50_ms", "dispatch_lag_p99_ms"):
        values = [r[key] for r in slices if r.get(key) is not None]
        out[key] = max(values) if values else None
    out["slice_p50_ms"] = [r["p50_ms"] for r in slices]
    return ("non_2xx", "errors", "measured")


def _merge_wrk(slices: list[dict[str, Any]], out: dict[str, Any]) -> tuple[str, ...]:
    # rps is requests over the slices' own time, not a mean of their rates
    seconds = sum(r["requests"] / r["rps"] for r in slices if r["rps"] and r["requests"])
    requests = sum(r["requests"] or 0 for r in slices)
    out["rps"] = round(requests / seconds, 2) if seconds else 0.0
    out["slice_rps"] = [r["rps"] for r in slices]
    return ("non_2xx", "socket_errors", "requests")


def merge_slices(slices: list[dict[str, Any]]) -> dict[str, Any]:
    """One run from the slices of one configuration in one round (wrk's or openloop.py's):
    throughput over their summed time, latency percentiles as the median of the slices'
    (a slice holds thousands of requests; its tail is its own), counts summed."""
    out: dict[str, Any] = {"slices": len(slices)}
    if "achieved_rps" in slices[0]:
        counts = _merge_open_loop(slices, out)
    else:
        counts = _merge_wrk(slices, out)
    for key in PERCENTILES:
        values = [r[key] for r in slices if r.get(key) is not None]
        out[key] = round(statistics.median(values), 4) if values else None
    for key in counts:
        out[key] = sum(int(r.get(key) or 0) for r in slices)
    return out


def interleaved(
    names: list[str],
    measure_one: Callable[[str], dict[str, Any]],
    duration: int,
    slice_s: int,
    first: int,
) -> dict[str, dict[str, Any]]:
    """`duration` seconds per configuration, in slices of `slice_s` taken in turn, the order
    rotated every cycle; merged per configuration (see merge_slices).

    Why: this VM's speed moves within seconds. Two identical servers measured 6 s one after the
    other differed by 9.4% (standard deviation of 6 rounds); the same two measured in 1 s slices
    taken in turn over the same 12 s, by 4.8%. A slow spell now lands on every configuration
    alike instead of on whichever ran then. One cycle more than needed runs first and is not
    counted: after waiting for the other servers' warm-ups, a server's first slice ran 8-25%
    below its next ones.
    """
    cycles = max(1, duration // slice_s)
    slices: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for c in range(cycles + 1):
        for name in rotated(names, first + c):
            r = measure_one(name)
            if c > 0:  # the first cycle is not counted: it ran 8-25% slow in a quick run
                slices[name].append(r)
    return {n: merge_slices(runs) for n, runs in slices.items()}
