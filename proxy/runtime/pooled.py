"""Drift windows over every worker's traffic (`workers = N`, DESIGN section 7).

A worker's monitors only count (tracker role "worker"): each keeps the cumulative bin counts of
what its version answered, and `publish` writes them into the worker's row of one shared
segment per monitor. The supervisor's monitors (role "pooled") are `advance`d with the sum of
every worker's row: windows are made of the pooled counts and judged once, so one drift
alert fires once for the group (N workers judging their own windows would raise N times the
false alarms, each on 1/N of the traffic). A restarted worker `adopt`s its slot's row first.

A segment's tag names the version, its drift settings and its count layout: a reload that
makes a new monitor (new settings) starts a new segment at zero in every process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from proxy.config.schema import VersionKey
from proxy.engine.pool import CountsPool
from proxy.engine.shared import SharedCounts
from proxy.monitoring.tracker import VersionMonitor
from proxy.monitoring.watch import VersionWatch, Watch


def _segment(pool: CountsPool, vw: VersionWatch, mon: VersionMonitor) -> SharedCounts:
    ident = "\0".join((vw.key.model, vw.key.version, repr(vw.drift), str(mon.layout.size)))
    tag = "h-" + hashlib.blake2b(ident.encode(), digest_size=10).hexdigest()
    return pool.segment(tag, mon.layout.size)


def _monitors(watch: Watch) -> Iterator[tuple[VersionKey, VersionWatch, VersionMonitor]]:
    for key, vw in list(watch.versions.items()):
        if vw.monitor is not None:
            yield key, vw, vw.monitor


def publish(pool: CountsPool, watch: Watch) -> None:
    """A worker's side: every monitor's cumulative counts into this worker's rows."""
    for _, vw, mon in _monitors(watch):
        _segment(pool, vw, mon).row(pool.slot)[:] = mon.cumulative


def adopt(pool: CountsPool, watch: Watch) -> None:
    """A (re)started worker's side: count on from what its slot published before."""
    for _, vw, mon in _monitors(watch):
        mon.cumulative[:] = _segment(pool, vw, mon).row(pool.slot)


def advance(pool: CountsPool, watch: Watch) -> None:
    """The supervisor's side: judge every monitor's windows on the group's pooled counts."""
    for key, vw, mon in _monitors(watch):
        watch.advance(key, _segment(pool, vw, mon).total())
