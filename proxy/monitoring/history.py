"""Latency and request rate over time, one point per interval, for the dashboard's plots."""

from __future__ import annotations

import time
from collections import deque
from time import perf_counter
from typing import Any

from proxy.engine.stats import LatencyHistogram, VersionStats

HISTORY_POINTS = 120  # points kept per version, one per HISTORY_EVERY_S
HISTORY_EVERY_S = 2.0
QUANTILES = ((0.5, "p50"), (0.9, "p90"), (0.99, "p99"))


class History:
    """One version's recent points: p50/p90/p99 (ms) and requests/s over each interval."""

    def __init__(self) -> None:
        self.points: deque[dict[str, Any]] = deque(maxlen=HISTORY_POINTS)
        self._last_counts: Any = None
        self._last_requests = 0

    def sample(self, stats: VersionStats) -> None:
        t = perf_counter()
        point: dict[str, Any] = {"t": t, "ts": round(time.time(), 3)}
        if self._last_counts is None:
            point.update({k: None for _, k in QUANTILES}, rps=None)
        else:
            h = LatencyHistogram.since(stats.latency, self._last_counts)
            for q, k in QUANTILES:
                v = h.quantile(q)
                point[k] = None if v is None else round(v * 1000, 4)
            last_t = self.points[-1]["t"] if self.points else t - HISTORY_EVERY_S
            point["rps"] = round((stats.requests - self._last_requests) / max(t - last_t, 1e-9), 2)
        self.points.append(point)
        self._last_counts = stats.latency.counts.copy()
        self._last_requests = stats.requests
