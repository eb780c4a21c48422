"""One view of a process group's counters: each worker publishes, readers sum (DESIGN section 7).

A worker counts in its own `Counters` (plain Python ints and numpy arrays: nothing on the request
path changes) and `publish`es them, every scheduler tick, into its own row of the group's shared
segments (engine/shared.py): absolute values, so a lost publish is made good by the next. Readers
(`pooled`) sum the rows into a fresh `Counters` and read it as they read one process's: the
status page, /metrics and the rollout gates see every worker's traffic.

A restarted worker first `adopt`s its slot's row (the counts its predecessor published) and
counts on from there, so the group's counts never go backwards; what a worker killed with -9
counted after its last publish (at most one tick) is lost with it.

Segments: one for the process's own counts, one per version, one per model; tags are hashes of
the names (segment names allow few characters), so readers name the keys they want.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from proxy.config.schema import VersionKey
from proxy.engine.counters import MODEL_COLUMNS, PROCESS_COLUMNS, VERSION_COLUMNS, Counters
from proxy.engine.shared import SharedCounts

DIGEST_HEX = 15  # hex digits of a config digest a member publishes (60 bits: fits an int64)
MEMBER_COLUMNS = 4  # pid, digest prefix, start (Unix ms), requests served


@dataclass(frozen=True, slots=True)
class Member:
    """One worker as it last said: its pid, the config digest it serves (prefix), its start."""

    slot: int
    pid: int
    digest_prefix: str
    started_at: float
    requests: int


# how `_read` takes a vector out of a segment: one slot's row, or the sum of every row
_Rows = Callable[[SharedCounts], np.ndarray[Any, Any]]


def _tag(kind: str, *names: str) -> str:
    digest = hashlib.blake2b("\0".join(names).encode(), digest_size=10).hexdigest()
    return f"{kind}-{digest}"


class CountsPool:
    """The shared rows of one process group (`group`: the supervisor's pid), `slots` workers;
    this process writes row `slot`."""

    def __init__(self, group: int, *, slots: int, slot: int) -> None:
        if not 0 <= slot < slots:
            raise ValueError(f"slot {slot} is not one of 0..{slots - 1}")
        self.group, self.slots, self.slot = group, slots, slot
        self._segments: dict[str, SharedCounts] = {}

    def segment(self, tag: str, columns: int) -> SharedCounts:
        """The group's segment for `tag` (made by whoever asks first), kept open here."""
        seg = self._segments.get(tag)
        if seg is None:
            seg = SharedCounts.open(self.group, tag, slots=self.slots, columns=columns)
            self._segments[tag] = seg
        return seg

    def _process(self) -> SharedCounts:
        return self.segment("process", PROCESS_COLUMNS)

    def _version(self, key: VersionKey) -> SharedCounts:
        return self.segment(_tag("v", key.model, key.version), VERSION_COLUMNS)

    def _model(self, model: str) -> SharedCounts:
        return self.segment(_tag("m", model), MODEL_COLUMNS)

    def publish(self, counters: Counters, keys: Iterable[VersionKey]) -> None:
        """Write this worker's counts (of `keys` and of their models) into its rows."""
        counters.write_process(self._process().row(self.slot))
        models: set[str] = set()
        for key in keys:
            counters.write_version(key, self._version(key).row(self.slot))
            models.add(key.model)
        for model in models:
            counters.write_model(model, self._model(model).row(self.slot))

    def adopt(self, counters: Counters, keys: Iterable[VersionKey]) -> None:
        """Start `counters` (a fresh worker's) from what this slot published before."""
        self._read(counters, keys, lambda seg: seg.row(self.slot))

    def pooled(self, keys: Iterable[VersionKey]) -> Counters:
        """Every worker's counts summed, as one `Counters` to read."""
        total = Counters()
        self._read(total, keys, lambda seg: seg.total())
        return total

    def refresh(self, counters: Counters, keys: Iterable[VersionKey]) -> None:
        """Overwrite `counters` in place with every worker's sum (the supervisor's view: the
        objects its plan and controllers hold see the group's traffic), keeping its own
        reload counts: the supervisor is the one that reloads first and refuses for all."""
        self._read(counters, keys, lambda seg: seg.total(), reloads=False)

    def publish_member(self, *, pid: int, digest: str, started_at: float, requests: int) -> None:
        """Say who serves this slot, which config it serves, and how many requests this slot
        has served (its predecessors' included): `members` reads it."""
        self._members().row(self.slot)[:] = (
            pid,
            int(digest[:DIGEST_HEX], 16) if digest else 0,
            round(started_at * 1000),
            requests,
        )

    def members(self) -> list[Member]:
        """Each slot's last `publish_member`, slot by slot (pid 0: never published)."""
        rows = self._members().per_slot()
        return [
            Member(slot=i, pid=int(r[0]), digest_prefix=f"{int(r[1]):0{DIGEST_HEX}x}",
                   started_at=int(r[2]) / 1000, requests=int(r[3]))
            for i, r in enumerate(rows)
        ]  # fmt: skip

    def _members(self) -> SharedCounts:
        return self.segment("members", MEMBER_COLUMNS)

    def _read(
        self, into: Counters, keys: Iterable[VersionKey], rows: _Rows, *, reloads: bool = True
    ) -> None:
        into.read_process(rows(self._process()), reloads=reloads)
        models: set[str] = set()
        for key in keys:
            into.read_version(key, rows(self._version(key)))
            models.add(key.model)
        for model in models:
            into.read_model(model, rows(self._model(model)))

    def close(self) -> None:
        """Let go of every mapping (a worker's exit); the segments stay for the group."""
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()
