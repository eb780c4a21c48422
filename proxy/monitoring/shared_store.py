"""Predictions for feedback to join, in shared memory: any worker joins any worker's answer.

Under `workers = N` (DESIGN section 7) feedback may reach another worker than the one that
answered. Each worker writes the predictions it answers into its own row of one segment per
model (engine/shared.py); a join looks in every row. The layout of a row, all int64:

* a header: the id ring's next position, the label arena's next position, evictions;
* the seq ring, for answers whose id the proxy made up: worker k of N makes the counters
  k + 1, k + 1 + N, ... (protocol/ids.py, one secret for the group), so a counter names its
  worker and its slot there, as in the one-process store: O(1);
* the id ring, for answers to requests with the client's own id: written in turn, each entry
  keyed by a 64-bit hash of the id, found by one vectorised scan per worker;
* the label arena: the answered labels (int64, or float64 bits for a regression model) of
  every entry, written in turn; an entry whose labels were overwritten is gone (evicted).

An entry is [key, version hash, rows, arena offset, kind, time]. Its writer marks it empty
(rows 0) while it rewrites it and sets rows last; a reader checks rows and key again after
reading, so it never takes half an entry. A join marks the entry taken (rows -1), in the row
of whichever worker wrote it: the one write that is not the row owner's. Two joins of one id
at the same instant on two workers may both succeed (counted twice); nothing else is lost.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from proxy.engine.shared import SharedCounts
from proxy.monitoring.feedback import Prediction
from proxy.protocol.ids import RequestIds

Array = np.ndarray[Any, Any]
KEY, VERSION, ROWS, OFFSET, KIND, AT = range(6)
ENTRY = 6
ID_POS, ARENA_POS, EVICTED, HEAD = 0, 1, 2, 4
ARENA_PER_ENTRY = 2  # label slots per kept prediction: room for the average answer of 2 rows
INT, FLOAT = 0, 1
TAKEN = -1


def _hash(text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def columns(capacity: int) -> int:
    """The int64s of one worker's row for `capacity` predictions."""
    return HEAD + 2 * capacity * ENTRY + ARENA_PER_ENTRY * capacity


class SharedPredictionStore:
    """PredictionStore's interface (put, get, pop) over every worker's shared rows."""

    def __init__(self, segment: SharedCounts, *, slot: int, capacity: int, ids: RequestIds) -> None:
        if segment.columns != columns(capacity):
            raise ValueError(f"a store of {capacity} needs {columns(capacity)} columns")
        self.capacity = capacity
        self._segment = segment
        self._slot = slot
        self._slots = segment.slots
        self._ids = ids
        self._names: dict[int, str] = {}
        self._version_hashes: dict[str, int] = {}
        cap = capacity
        self._seq_at = slice(HEAD, HEAD + cap * ENTRY)
        self._id_at = slice(self._seq_at.stop, self._seq_at.stop + cap * ENTRY)
        self._arena_at = slice(self._id_at.stop, self._id_at.stop + ARENA_PER_ENTRY * cap)
        row = segment.row(slot)
        self._head = row[:HEAD]
        self._seq = row[self._seq_at].reshape(cap, ENTRY)
        self._by_id = row[self._id_at].reshape(cap, ENTRY)
        self._arena = row[self._arena_at]

    def know(self, versions: Iterable[str]) -> None:
        """Version names a stored hash may stand for (any worker's, same config)."""
        for v in versions:
            self._names[_hash(v)] = v

    @property
    def evicted(self) -> int:
        return int(self._head[EVICTED])

    def put(self, request_id: str, version: str, labels: Array, seq: int = -1) -> None:
        """Keep a prediction in this worker's row; `seq` >= 0: `request_id` was made from it."""
        flat = labels.reshape(-1)
        n = int(flat.size)
        if n == 0 or n > ARENA_PER_ENTRY * self.capacity:
            return
        vh = self._version_hashes.get(version)
        if vh is None:
            vh = self._version_hashes[version] = _hash(version)
            self._names[vh] = version
        if seq >= 0:
            entry, key = self._seq[((seq - 1) // self._slots) % self.capacity], seq
        else:
            pos = int(self._head[ID_POS])
            entry, key = self._by_id[pos % self.capacity], _hash(request_id)
            self._head[ID_POS] = pos + 1
        if entry[ROWS] > 0:
            self._head[EVICTED] += 1
        entry[ROWS] = 0  # being written
        offset = int(self._head[ARENA_POS])
        a = self._arena.size
        kind = FLOAT if flat.dtype.kind == "f" else INT
        if n == 1:  # most answers: element writes, no temporary arrays (the request path)
            v = flat[0]
            self._arena[offset % a] = np.float64(v).view(np.int64) if kind == FLOAT else int(v)
        else:
            idx = (offset + np.arange(n)) % a
            if kind == FLOAT:
                self._arena[idx] = flat.astype(np.float64).view(np.int64)
            else:
                self._arena[idx] = flat.astype(np.int64)
        self._head[ARENA_POS] = offset + n
        entry[KEY:ROWS] = key, vh  # KEY, VERSION
        entry[OFFSET:] = offset, kind, time.monotonic_ns()  # OFFSET, KIND, AT
        entry[ROWS] = n  # last: the entry is whole

    def get(self, request_id: str, *, remove: bool = False) -> Prediction | None:
        """The newest stored prediction for `request_id` in any worker's row (None if never
        kept, joined or dropped); `remove` marks it taken (a prediction is joined once)."""
        rows = [self._segment.row(s) for s in range(self._slots)]
        seq = self._ids.seq_of(request_id)
        found: list[tuple[int, Array, Array]] = []  # (time, entry, that worker's row)
        if seq is not None:
            owner = (seq - 1) % self._slots
            row = rows[owner]
            entries = row[self._seq_at].reshape(self.capacity, ENTRY)
            entry = entries[((seq - 1) // self._slots) % self.capacity]
            if entry[KEY] == seq and entry[ROWS] > 0:
                found.append((int(entry[AT]), entry, row))
        else:
            key = _hash(request_id)
            for row in rows:
                entries = row[self._id_at].reshape(self.capacity, ENTRY)
                for i in np.flatnonzero((entries[:, KEY] == key) & (entries[:, ROWS] > 0)):
                    found.append((int(entries[i, AT]), entries[i], row))
        for _, entry, row in sorted(found, key=lambda f: f[0], reverse=True):
            prediction = self._read(entry, row)
            if prediction is None:
                continue
            if remove:
                entry[ROWS] = TAKEN
            return prediction
        return None

    def _read(self, entry: Array, row: Array) -> Prediction | None:
        n, key, offset = int(entry[ROWS]), int(entry[KEY]), int(entry[OFFSET])
        version, kind = self._names.get(int(entry[VERSION])), int(entry[KIND])
        arena = row[self._arena_at]
        if n <= 0 or version is None or int(row[ARENA_POS]) - offset > arena.size - n:
            return None  # taken, or its labels were overwritten since
        values = arena[(offset + np.arange(n)) % arena.size].copy()
        if int(entry[ROWS]) != n or int(entry[KEY]) != key:
            return None  # rewritten while it was read
        labels = values.view(np.float64) if kind == FLOAT else values
        return Prediction(version, labels)

    def pop(self, request_id: str) -> Prediction | None:
        return self.get(request_id, remove=True)

    def __len__(self) -> int:
        """Predictions kept in this worker's row."""
        return int((self._seq[:, ROWS] > 0).sum() + (self._by_id[:, ROWS] > 0).sum())
