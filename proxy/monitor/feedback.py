"""Concept drift: ground truth joined to stored predictions, rolling accuracy per version."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .tracker import Window

Array = np.ndarray[Any, Any]
CORRECT = 1  # counter slot next to ROWS (0) in the accuracy windows


@dataclass(slots=True)
class Prediction:
    version: str
    labels: Array  # one per input row


class PredictionStore:
    """The last `capacity` predictions by request id; the oldest are dropped (and counted)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Prediction] = OrderedDict()
        self.evicted = 0

    def put(self, request_id: str, version: str, labels: Array) -> None:
        items = self._items
        items[request_id] = Prediction(version, labels)
        if len(items) > self.capacity:
            items.popitem(last=False)
            self.evicted += 1

    def pop(self, request_id: str) -> Prediction | None:
        return self._items.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class AccuracyTracker:
    """Correct answers over the last `window` and `long_window` labelled rows of one version."""

    window_rows: int
    long_window_rows: int
    min_rows: int
    short: Window = field(init=False)
    long: Window = field(init=False)
    total: Array = field(init=False)

    def __post_init__(self) -> None:
        self.short = Window(self.window_rows, 2)
        self.long = Window(self.long_window_rows, 2)
        self.total = np.zeros(2, dtype=np.int64)

    def record(self, predicted: Array, truth: Array) -> None:
        counts = np.array([predicted.size, int(np.sum(predicted == truth))], dtype=np.int64)
        self.total += counts
        self.long.add(counts)
        self.short.add(counts)

    def accuracy(self, which: str) -> float | None:
        """Accuracy of a window once it holds at least `min_rows` labelled rows."""
        w = self.short if which == "short" else self.long
        counts = w.total + w.current
        rows = int(counts[0])
        if rows < self.min_rows:
            return None
        return float(counts[CORRECT]) / rows

    @property
    def rows(self) -> int:
        return int(self.total[0])
