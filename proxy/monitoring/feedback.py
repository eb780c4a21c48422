"""Concept drift: ground truth joined to stored predictions, rolling accuracy per version."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from proxy.monitoring.tracker import Window
from proxy.protocol.ids import RequestIds

Array = np.ndarray[Any, Any]
CORRECT = 1  # counter slot next to ROWS (0): correct answers, or the sum of absolute errors


@dataclass(slots=True)
class Prediction:
    version: str
    labels: Array  # one per input row


class PredictionStore:
    """The last `capacity` predictions by request id; the oldest are dropped (and counted).

    It sits on every request's path, so a put allocates nothing of its own. Two rings of
    preallocated slots:

    * answers to requests that came without an id, whose id `ids` made up from a counter
      (`seq`): slot `seq % capacity`, no dict and no id string kept (an id whose tag `ids`
      does not vouch for is not found);
    * answers to requests with the client's own id: the next slot, found again through a dict
      from id to slot.

    A one-row prediction is kept as a plain int, not as the numpy view its response was built
    from. (Keeping 100,000 views and id strings, each dropped long after its request, cost the
    serving loop 1.6 us per request in cache misses, against 0.5 us in a tight loop.)
    """

    def __init__(self, capacity: int, ids: RequestIds) -> None:
        self.capacity = capacity
        self._request_ids = ids
        self._slot: dict[str, int] = {}
        self._ids: list[str | None] = [None] * capacity
        self._versions: list[str] = [""] * capacity
        self._labels: list[int | Array | None] = [None] * capacity
        self._next = 0
        self._seqs = np.full(capacity, -1, dtype=np.int64)
        self._seq_versions: list[str] = [""] * capacity
        self._seq_labels: list[int | Array | None] = [None] * capacity
        self._seq_live = 0
        self.evicted = 0

    def put(self, request_id: str, version: str, labels: Array, seq: int = -1) -> None:
        """Keep a prediction; `seq` >= 0 says `request_id` was made up from that counter."""
        kept = labels.item() if labels.size == 1 else labels.reshape(-1).copy()
        if seq >= 0:
            k = seq % self.capacity
            if self._seq_labels[k] is None:
                self._seq_live += 1
            else:
                self.evicted += 1
            self._seqs[k] = seq
            self._seq_versions[k] = version
            self._seq_labels[k] = kept
            return
        k = self._next
        old = self._ids[k]
        if old is not None and self._slot.get(old) == k:
            del self._slot[old]
            self.evicted += 1
        previous = self._slot.get(request_id)
        if previous is not None:  # the same id again: the newer answer wins
            self._ids[previous] = None
        self._ids[k] = request_id
        self._versions[k] = version
        self._labels[k] = kept
        self._slot[request_id] = k
        self._next = k + 1 if k + 1 < self.capacity else 0

    def get(self, request_id: str, *, remove: bool = False) -> Prediction | None:
        """The stored prediction for `request_id` (None if never kept, joined or dropped);
        `remove` takes it out (a prediction is joined once)."""
        k = self._slot.get(request_id)
        if k is not None:
            labels, version = self._labels[k], self._versions[k]
            if remove:
                del self._slot[request_id]
                self._ids[k] = None
                self._labels[k] = None
        else:
            seq = self._request_ids.seq_of(request_id)
            if seq is None:
                return None
            k = seq % self.capacity
            labels, version = self._seq_labels[k], self._seq_versions[k]
            if labels is None or self._seqs[k] != seq:
                return None
            if remove:
                self._seq_labels[k] = None
                self._seq_live -= 1
        assert labels is not None
        return Prediction(version, np.atleast_1d(np.asarray(labels)))

    def pop(self, request_id: str) -> Prediction | None:
        return self.get(request_id, remove=True)

    def know(self, versions: Iterable[str]) -> None:
        """Nothing to learn: this store keeps version names as they are."""

    def __len__(self) -> int:
        return len(self._slot) + self._seq_live


@dataclass
class AccuracyTracker:
    """How right a version's answers were on the last `window` and `long_window` rows with
    ground truth: accuracy (classification), or mean absolute error (`regression`)."""

    window_rows: int
    long_window_rows: int
    min_rows: int
    regression: bool = False
    short: Window = field(init=False)
    long: Window = field(init=False)
    total: Array = field(init=False)

    def __post_init__(self) -> None:
        # counters [rows, sum of |error|] (regression) or [rows, correct answers]
        dtype = np.float64 if self.regression else np.int64
        self.short = Window(self.window_rows, 2, dtype)
        self.long = Window(self.long_window_rows, 2, dtype)
        self.total = np.zeros(2, dtype=dtype)

    def record(self, predicted: Array, truth: Array) -> None:
        if self.regression:
            err = np.abs(predicted.astype(np.float64) - truth.astype(np.float64))
            counts = np.array([predicted.size, float(err.sum())], dtype=np.float64)
        else:
            counts = np.array([predicted.size, int(np.sum(predicted == truth))], dtype=np.int64)
        self.total += counts
        self.long.add(counts)
        self.short.add(counts)

    def advance(self, total: Array) -> bool:
        """A pooled tracker's step (`workers = N`): `total` is the group's [rows, correct] (or
        [rows, sum of |error|]) now; what it grew by is folded into the windows. True when
        there was something new."""
        delta = total - self.total
        if delta[0] < 0 or (delta < 0).any():
            self.total = total.astype(self.total.dtype)  # a worker started over
            return False
        if delta[0] == 0:
            return False
        self.total = total.astype(self.total.dtype)
        self.long.add(delta)
        self.short.add(delta)
        return True

    def _score(self, which: str) -> float | None:
        w = self.short if which == "short" else self.long
        counts = w.total + w.current
        rows = int(counts[0])
        if rows < self.min_rows:
            return None
        return float(counts[CORRECT]) / rows

    def accuracy(self, which: str) -> float | None:
        """Accuracy of a window once it holds at least `min_rows` labelled rows."""
        return None if self.regression else self._score(which)

    def mae(self, which: str) -> float | None:
        """Mean absolute error of a window (regression) once it holds `min_rows` rows."""
        return self._score(which) if self.regression else None

    @property
    def rows(self) -> int:
        return int(self.total[0])
