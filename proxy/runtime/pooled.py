"""Drift windows over every worker's traffic (`workers = N`, DESIGN section 7).

A worker's monitors only count (and its feedback joins only count: accuracy is judged the same
way) (tracker role "worker"): each keeps the cumulative bin counts of
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
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from proxy.config.schema import VersionKey
from proxy.engine.pool import CountsPool
from proxy.engine.shared import SharedCounts, SharedCountsError
from proxy.engine.stats import NANO
from proxy.monitoring.shared_store import SharedPredictionStore
from proxy.monitoring.shared_store import columns as store_columns
from proxy.monitoring.tracker import VersionMonitor
from proxy.monitoring.watch import Stores, VersionWatch, Watch
from proxy.protocol.ids import RequestIds


def _segment(pool: CountsPool, vw: VersionWatch, mon: VersionMonitor) -> SharedCounts:
    ident = "\0".join((vw.key.model, vw.key.version, repr(vw.drift), str(mon.layout.size)))
    tag = "h-" + hashlib.blake2b(ident.encode(), digest_size=10).hexdigest()
    return pool.segment(tag, mon.layout.size)


def _accuracy_segment(pool: CountsPool, vw: VersionWatch) -> SharedCounts:
    ident = "\0".join((vw.key.model, vw.key.version, repr(vw.drift), str(vw.accuracy.regression)))
    tag = "a-" + hashlib.blake2b(ident.encode(), digest_size=10).hexdigest()
    return pool.segment(tag, 2)


def _accuracy_vector(vw: VersionWatch) -> np.ndarray[Any, Any]:
    """[rows, correct] or, for a regression model, [rows, sum of |error| in nano-units]."""
    t = vw.accuracy.total
    if vw.accuracy.regression:
        return np.array([round(float(t[0])), round(float(t[1]) * NANO)], dtype=np.int64)
    return t.astype(np.int64)


def _accuracy_total(vw: VersionWatch, v: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    if vw.accuracy.regression:
        return np.array([float(v[0]), float(v[1]) / NANO])
    return v.astype(np.int64)


def _monitors(watch: Watch) -> Iterator[tuple[VersionKey, VersionWatch, VersionMonitor]]:
    for key, vw in list(watch.versions.items()):
        if vw.monitor is not None:
            yield key, vw, vw.monitor


def publish(pool: CountsPool, watch: Watch) -> None:
    """A worker's side: every monitor's cumulative counts, and the feedback it joined, into
    this worker's rows."""
    for _, vw, mon in _monitors(watch):
        _segment(pool, vw, mon).row(pool.slot)[:] = mon.cumulative
    for vw in list(watch.versions.values()):
        _accuracy_segment(pool, vw).row(pool.slot)[:] = _accuracy_vector(vw)


def adopt(pool: CountsPool, watch: Watch) -> None:
    """A (re)started worker's side: count on from what its slot published before."""
    for _, vw, mon in _monitors(watch):
        mon.cumulative[:] = _segment(pool, vw, mon).row(pool.slot)
    for vw in list(watch.versions.values()):
        row = _accuracy_segment(pool, vw).row(pool.slot)
        vw.accuracy.total = _accuracy_total(vw, row).astype(vw.accuracy.total.dtype)


def advance(pool: CountsPool, watch: Watch) -> None:
    """The supervisor's side: judge every monitor's windows, and accuracy on fed-back labels,
    on the group's pooled counts."""
    for key, vw, mon in _monitors(watch):
        watch.advance(key, _segment(pool, vw, mon).total())
    for key, vw in list(watch.versions.items()):
        watch.advance_accuracy(key, _accuracy_total(vw, _accuracy_segment(pool, vw).total()))


# ---------------------------------------------------------------- request ids and predictions

SECRET_WORDS = 4  # the group's id secret: 32 bytes as 4 int64s
ID_GAP = 1 << 20  # counters a restarted worker skips past what its slot last published


def make_secret(pool: CountsPool) -> None:
    """The supervisor's side, before any worker starts: one id secret for the whole group, so
    that any worker can check (and find the owner of) an id another made up."""
    words = np.frombuffer(os.urandom(8 * SECRET_WORDS), dtype=np.int64)
    pool.segment("secret", SECRET_WORDS).row(0)[:] = words


def request_ids(pool: CountsPool) -> RequestIds:
    """A worker's id maker: the group's secret, this slot's counters (slot k of N makes
    k + 1, k + 1 + N, ...), starting past every counter this slot made before a restart."""
    words = pool.segment("secret", SECRET_WORDS).row(0)
    if not words.any():
        raise SharedCountsError(
            "the group's id secret is not set (start workers from mlproxy serve)"
        )
    secret = words.astype(np.int64).tobytes()
    made = int(pool.segment("ids", 1).row(pool.slot)[0])
    start = pool.slot + 1
    if made:
        start = made + ID_GAP * pool.slots
        start -= (start - (pool.slot + 1)) % pool.slots  # keep this slot's residue
    return RequestIds(secret, start=start, step=pool.slots)


def publish_ids(pool: CountsPool, ids: RequestIds) -> None:
    pool.segment("ids", 1).row(pool.slot)[0] = ids.next_seq


def prediction_stores(pool: CountsPool, ids: RequestIds) -> Stores:
    """Model, capacity -> that model's store in the group's shared memory."""

    def store(model: str, capacity: int) -> SharedPredictionStore:
        ident = f"{model}\0{capacity}"
        tag = "p-" + hashlib.blake2b(ident.encode(), digest_size=10).hexdigest()
        seg = pool.segment(tag, store_columns(capacity))
        return SharedPredictionStore(seg, slot=pool.slot, capacity=capacity, ids=ids)

    return store
