"""What both Prometheus collectors share: a collector that reads one snapshot of live state
per scrape, the per-version labels, and histogram buckets as Prometheus bounds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from proxy.engine.stats import LatencyHistogram

S = TypeVar("S")
MV = ("model", "version")  # the labels of every per-version family


class SnapshotCollector(Collector, Generic[S]):
    """A collector that reads one snapshot of live state per scrape (no per-request cost)."""

    def __init__(self, snapshot: Callable[[], S]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # families depend on what is served: nothing to pre-declare


def buckets(h: LatencyHistogram) -> list[tuple[str, float]]:
    """A latency histogram's cumulative buckets, as Prometheus `le` bounds."""
    return [(le(b), c) for b, c in h.cumulative_export()]


def le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:.6g}"
