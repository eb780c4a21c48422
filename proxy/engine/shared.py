"""Counts in shared memory: one row per worker, written by that worker only, summed by readers.

The ground floor of `workers = N` (DESIGN section 7): every count a plane reads (requests,
histogram bins, latency buckets) becomes a column of an int64 array in a
`multiprocessing.shared_memory` segment with one row per worker slot. A worker adds to its own
row with plain numpy writes (no lock: a row has one writer); a reader sums the rows. A reader
may see a row half-way through one batch's update (some bins added, others not yet): counts are
monotone, so the sum is at most one batch behind, never wrong for longer.

Ownership: the supervisor `create`s every segment and `unlink`s it when it exits; workers
`attach` and only `close`. A worker killed with -9 therefore leaves nothing behind (its row
stays, summed like any other, and the restarted worker takes the same slot and goes on adding).
Names carry the owner's pid (`mlproxy-<pid>-<tag>`), so `sweep_stale` can remove what an owner
killed with -9 left, the next time one starts (no process's resource tracker is let remove
them: see `_untrack`).
"""

from __future__ import annotations

import os
import re
import time
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]
PREFIX = "mlproxy"
SHM_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared memory (shm_open) by name
MAGIC = 0x6D6C70726F787931  # "mlproxy1": a segment made by this module, in this layout
HEADER = 4  # int64s before the counts: magic, slots, columns, owner pid
OPEN_WAIT_S = 1.0  # how long `open` waits for another process to finish making a segment
_NAME = re.compile(rf"^{PREFIX}-(\d+)-[A-Za-z0-9_.-]+$")


class SharedCountsError(Exception):
    """A segment that is missing, or not the shape its reader expects."""


class SharedCounts:
    """`slots` rows of `columns` int64 counts in one named shared memory segment."""

    def __init__(self, shm: shared_memory.SharedMemory, *, slots: int, columns: int) -> None:
        self._shm = shm
        self.name = shm.name
        self.slots = slots
        self.columns = columns
        buf: Array = np.ndarray((HEADER + slots * columns,), dtype=np.int64, buffer=shm.buf)
        self._header: Array = buf[:HEADER]
        self._rows: Array = buf[HEADER:].reshape(slots, columns)

    @classmethod
    def create(
        cls, tag: str, *, slots: int, columns: int, group: int | None = None
    ) -> SharedCounts:
        """A new zeroed segment named for `group` (default: this process, which then replaces
        a leftover of its pid) and `tag`. The group's pid is its owner: only the owner's exit
        (`unlink_owned`, or `sweep_stale` after it) removes it, whoever of the group made it."""
        if slots < 1 or columns < 0:
            raise ValueError(
                f"a shared count array needs slots >= 1 and columns >= 0, not {slots}, {columns}"
            )
        me = os.getpid()
        owner = me if group is None else group
        name = segment_name(owner, tag)
        size = 8 * (HEADER + slots * columns)
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        except FileExistsError:
            if group is not None:
                raise  # the group's: `open` attaches to it
            # this pid's own leftover (a pid reused after a kill -9)
            stale = shared_memory.SharedMemory(name=name)
            stale.close()
            stale.unlink()
            shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        _untrack(shm)
        counts = cls(shm, slots=slots, columns=columns)
        counts._rows[:] = 0
        counts._header[1:] = (slots, columns, owner)
        counts._header[0] = MAGIC  # last: a reader that sees the magic sees the shape
        return counts

    @classmethod
    def open(cls, group: int, tag: str, *, slots: int, columns: int) -> SharedCounts:
        """The group's segment for `tag`, made by whichever process of the group asks first
        (a worker meeting a version the others have not served yet)."""
        try:
            return cls.create(tag, slots=slots, columns=columns, group=group)
        except FileExistsError:
            pass
        name = segment_name(group, tag)
        deadline = time.monotonic() + OPEN_WAIT_S
        while True:  # its maker may be between creating it and writing its header
            try:
                return cls.attach(name, slots=slots, columns=columns)
            except SharedCountsError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.001)  # bounded by OPEN_WAIT_S: a header is 4 stores away

    @classmethod
    def attach(cls, name: str, *, slots: int, columns: int) -> SharedCounts:
        """An existing segment (a worker's side), checked against the shape expected."""
        try:
            shm = shared_memory.SharedMemory(name=name)
        except FileNotFoundError:
            raise SharedCountsError(f"shared memory segment {name} does not exist") from None
        except ValueError:  # mmap of an empty file: its maker has not sized it yet
            raise SharedCountsError(f"shared memory segment {name} is still being made") from None
        if shm.size < 8 * HEADER:
            _untrack(shm)
            shm.close()
            raise SharedCountsError(f"shared memory segment {name} is still being made")
        header: Array = np.ndarray((HEADER,), dtype=np.int64, buffer=shm.buf)
        found = (int(header[0]), int(header[1]), int(header[2]))
        del header
        _untrack(shm)
        if found != (MAGIC, slots, columns):
            shm.close()
            raise SharedCountsError(
                f"shared memory segment {name} holds {found[1]} x {found[2]} counts"
                f" (magic {found[0]:#x}), not the {slots} x {columns} expected"
            )
        return cls(shm, slots=slots, columns=columns)

    def row(self, slot: int) -> Array:
        """Slot `slot`'s row: a view its one writer adds to in place."""
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} is not one of 0..{self.slots - 1}")
        row: Array = self._rows[slot]
        return row

    def total(self) -> Array:
        """Every slot's row summed (a copy)."""
        total: Array = self._rows.sum(axis=0)
        return total

    def per_slot(self) -> Array:
        """A copy of every row (slot x column)."""
        return self._rows.copy()

    def close(self) -> None:
        """Let go of the mapping (the segment stays for the others)."""
        self._header = np.zeros(0, dtype=np.int64)
        self._rows = np.zeros((0, 0), dtype=np.int64)
        try:
            self._shm.close()
        except BufferError:  # a caller still holds a row's view: the mapping goes at exit
            pass

    def unlink(self) -> None:
        """Remove the segment's name (the owner, once every worker is gone); then close."""
        name = self.name
        self.close()
        try:
            (SHM_DIR / name.lstrip("/")).unlink()
        except FileNotFoundError:
            pass


def _untrack(shm: shared_memory.SharedMemory) -> None:
    """Python 3.11 registers every segment a process makes or attaches with that process's
    resource tracker, which unlinks it when that process exits: a worker's exit would remove
    the group's segment in use. Ours are removed by their owner (`unlink`, `unlink_owned`) and,
    after an owner killed with -9, by the next `sweep_stale`; never by a tracker."""
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]


def segment_name(pid: int, tag: str) -> str:
    name = f"{PREFIX}-{pid}-{tag}"
    if not _NAME.match(name):
        raise ValueError(f"a shared memory tag is letters, digits, '_', '.' and '-', not {tag!r}")
    return name


def sweep_stale(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink every mlproxy segment whose owner is no longer alive (what an owner killed with -9
    left); returns their names. Segments of live owners are left alone."""
    removed: list[str] = []
    try:
        entries = sorted(shm_dir.iterdir())
    except OSError:
        return removed
    for path in entries:
        m = _NAME.match(path.name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            path.unlink()
        except OSError:
            continue
        removed.append(path.name)
    return removed


def unlink_owned(pid: int, shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink every segment of `pid`'s group (its owner's exit, once its workers are gone),
    whoever of the group made it; returns their names."""
    removed: list[str] = []
    for name in owned_by(pid, shm_dir):
        try:
            (shm_dir / name).unlink()
        except OSError:
            continue
        removed.append(name)
    return removed


def owned_by(pid: int, shm_dir: Path = SHM_DIR) -> list[str]:
    """The names of the mlproxy segments owned by `pid` (tests: nothing left behind)."""
    try:
        return sorted(p.name for p in shm_dir.iterdir() if p.name.startswith(f"{PREFIX}-{pid}-"))
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
