"""Per-version counters and log-bucketed latency histograms, kept as numpy arrays."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Latency bucket edges 10**(k/40) s: 40 per decade (ratio 1.059), from ~50 us to ~31.6 s, so a
# percentile read at a bucket's geometric middle is within 3% of the true value.
_K_LO, _K_HI, _PER_DECADE = -172, 60, 40
LATENCY_EDGES = 10.0 ** (np.arange(_K_LO, _K_HI + 1) / _PER_DECADE)
# Prometheus gets every 10th edge (4 per decade: 100 us, 178 us, 316 us, 562 us, 1 ms, ...).
EXPORT_EVERY = 10
_LOG_LO = _K_LO / _PER_DECADE
N_LATENCY_BINS = LATENCY_EDGES.size + 1  # bin 0: below the first edge; last bin: above the last

# The vector layout of `VersionStats.write`: [requests, errors, rows, latency sum (ns)],
# latency bucket counts, then the mirror's [sent, dropped, yielded, failed, compared,
# label_rows, agreed, |diff| sum (nano-units), |diff| count, breaker_opened, latency sum (ns)]
# and its latency bucket counts.
NANO = 1e9
_V_SCALARS, _M_SCALARS = 4, 11
MIRROR_COLUMNS = _M_SCALARS + N_LATENCY_BINS
_V_MIRROR = _V_SCALARS + N_LATENCY_BINS
STATS_COLUMNS = _V_MIRROR + MIRROR_COLUMNS


def latency_bin(seconds: float) -> int:
    """Index of the bucket holding `seconds` (bucket i covers [edges[i-1], edges[i]))."""
    if seconds <= LATENCY_EDGES[0]:
        return 0
    i = int((math.log10(seconds) - _LOG_LO) * _PER_DECADE) + 1
    return i if i < N_LATENCY_BINS else N_LATENCY_BINS - 1


class LatencyHistogram:
    """Counts of latencies in log-spaced buckets; percentiles from the buckets."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = np.zeros(N_LATENCY_BINS, dtype=np.int64)
        self.sum = 0.0

    @classmethod
    def since(cls, now: LatencyHistogram, earlier_counts: np.ndarray[Any, Any]) -> LatencyHistogram:
        """What `now` recorded after its counts were `earlier_counts` (a window of it)."""
        h = cls()
        h.counts = now.counts - earlier_counts
        return h

    def observe(self, seconds: float) -> None:
        self.counts[latency_bin(seconds)] += 1
        self.sum += seconds

    def observe_many(self, seconds: np.ndarray[Any, Any]) -> None:
        idx = np.searchsorted(LATENCY_EDGES, seconds, side="right")
        self.counts += np.bincount(idx, minlength=N_LATENCY_BINS)
        self.sum += float(seconds.sum())

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float | None:
        """The q-quantile in seconds (geometric middle of its bucket), None when empty."""
        total = self.counts.sum()
        if total == 0:
            return None
        rank = q * total
        i = int(np.searchsorted(np.cumsum(self.counts), rank, side="left"))
        i = min(max(i, 0), N_LATENCY_BINS - 1)
        if i == 0:
            return float(LATENCY_EDGES[0])
        if i == N_LATENCY_BINS - 1:
            return float(LATENCY_EDGES[-1])
        return float(math.sqrt(LATENCY_EDGES[i - 1] * LATENCY_EDGES[i]))

    def cumulative_export(self) -> list[tuple[float, int]]:
        """(upper bound, cumulative count) at the coarse Prometheus bucket bounds, then +Inf."""
        cum = np.cumsum(self.counts)
        out = [
            (float(LATENCY_EDGES[i]), int(cum[i]))
            for i in range(0, LATENCY_EDGES.size, EXPORT_EVERY)
        ]
        out.append((math.inf, int(cum[-1])))
        return out


@dataclass(slots=True)
class MirrorStats:
    """How one mirror version fared against the primary, in shadow mode."""

    sent: int = 0  # rows handed to the mirror
    dropped: int = 0  # rows dropped: queue full, or breaker open
    yielded: int = 0  # rows not mirrored because the serving loop was busy (see MirrorLane)
    failed: int = 0  # rows in batches that failed or timed out
    compared: int = 0  # rows whose answers were compared with the primary's
    label_rows: int = 0  # compared rows that have an integer (label) output
    agreed: int = 0  # of those, rows where the labels agreed
    abs_diff_sum: float = 0.0
    abs_diff_count: int = 0
    breaker_opened: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def agreement(self) -> float | None:
        return self.agreed / self.label_rows if self.label_rows else None

    def write(self, out: np.ndarray[Any, Any]) -> None:
        """Everything into `out` (MIRROR_COLUMNS int64s, see `VersionStats.write`)."""
        out[:_M_SCALARS] = (
            self.sent, self.dropped, self.yielded, self.failed, self.compared, self.label_rows,
            self.agreed, round(self.abs_diff_sum * NANO), self.abs_diff_count,
            self.breaker_opened, round(self.latency.sum * NANO),
        )  # fmt: skip
        out[_M_SCALARS:] = self.latency.counts

    def read(self, v: np.ndarray[Any, Any]) -> None:
        """Take every field from a vector `write` wrote (or a sum of such vectors)."""
        (
            self.sent, self.dropped, self.yielded, self.failed, self.compared, self.label_rows,
            self.agreed, diff_nano, self.abs_diff_count, self.breaker_opened, latency_nano,
        ) = (int(x) for x in v[:_M_SCALARS])  # fmt: skip
        self.abs_diff_sum = diff_nano / NANO
        self.latency.sum = latency_nano / NANO
        self.latency.counts = np.array(v[_M_SCALARS:MIRROR_COLUMNS], dtype=np.int64)

    def mean_abs_diff(self) -> float | None:
        return self.abs_diff_sum / self.abs_diff_count if self.abs_diff_count else None


@dataclass(slots=True)
class VersionStats:
    """Requests, errors and latency of one model version, as the primary answering clients."""

    requests: int = 0
    errors: int = 0
    rows: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    mirror: MirrorStats = field(default_factory=MirrorStats)

    def write(self, out: np.ndarray[Any, Any]) -> None:
        """Every count into `out`, a vector of STATS_COLUMNS int64s: the row a worker
        publishes into shared memory (engine/shared.py), so that a sum of workers' vectors is
        the process group's statistics. Float sums travel as integer nano-units (a latency
        sum in ns: 292 years before it overflows), rounded from the exact running sum each time."""
        out[:_V_SCALARS] = (self.requests, self.errors, self.rows, round(self.latency.sum * NANO))
        out[_V_SCALARS:_V_MIRROR] = self.latency.counts
        self.mirror.write(out[_V_MIRROR:STATS_COLUMNS])

    def read(self, v: np.ndarray[Any, Any]) -> None:
        """Take every count from a vector `write` wrote, or a sum of several: a pooled view,
        or a restarted worker adopting its slot's counts so that they never go backwards."""
        self.requests, self.errors, self.rows, latency_nano = (int(x) for x in v[:_V_SCALARS])
        self.latency.sum = latency_nano / NANO
        self.latency.counts = np.array(v[_V_SCALARS:_V_MIRROR], dtype=np.int64)
        self.mirror.read(v[_V_MIRROR:STATS_COLUMNS])

    @classmethod
    def from_vector(cls, v: np.ndarray[Any, Any]) -> VersionStats:
        st = cls()
        st.read(v)
        return st

    def started(self, rows: int) -> None:
        """A request of `rows` rows went to this version."""
        self.requests += 1
        self.rows += rows

    def answered(self, seconds: float) -> None:
        """This version answered a request it started, in `seconds`."""
        self.latency.observe(seconds)

    def failed(self, seconds: float) -> None:
        """This version failed a request it started, after `seconds` (its own time to fail)."""
        self.errors += 1
        self.latency.observe(seconds)

    def summary(self) -> dict[str, Any]:
        p50 = self.latency.quantile(0.5)
        p99 = self.latency.quantile(0.99)
        m = self.mirror
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rows": self.rows,
            "p50_ms": None if p50 is None else round(p50 * 1000, 4),
            "p99_ms": None if p99 is None else round(p99 * 1000, 4),
            "mirror": {
                "sent": m.sent,
                "dropped": m.dropped,
                "yielded": m.yielded,
                "failed": m.failed,
                "compared": m.compared,
                "agreement": m.agreement(),
                "mean_abs_diff": m.mean_abs_diff(),
                "breaker_opened": m.breaker_opened,
            },
        }


def compare_outputs(
    primary: dict[str, np.ndarray[Any, Any]],
    mirror: dict[str, np.ndarray[Any, Any]],
    stats: MirrorStats,
) -> None:
    """Fold one batch's comparison into `stats`: integer outputs by agreement, floats by |diff|."""
    rows = 0
    for name, p in primary.items():
        m = mirror.get(name)
        if m is None or m.shape != p.shape:
            continue
        rows = p.shape[0]
        if p.dtype.kind in "iub":
            same = p == m
            if same.ndim > 1:
                same = same.all(axis=tuple(range(1, same.ndim)))
            stats.agreed += int(same.sum())
            stats.label_rows += int(same.shape[0])
        else:
            stats.abs_diff_sum += float(np.abs(p.astype(np.float64) - m).sum())
            stats.abs_diff_count += int(p.size)
    stats.compared += rows
