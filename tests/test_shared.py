"""Shared-memory counts (engine/shared.py): rows per worker summed by readers, across real
processes, and nothing left in /dev/shm after any exit, a kill -9 included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.engine.shared import (
    SharedCounts,
    SharedCountsError,
    owned_by,
    segment_name,
    sweep_stale,
)

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 20.0

# A worker: attach, add `n` to every column of its row one by one, print "done".
WORKER = textwrap.dedent(
    """
    import sys
    from proxy.engine.shared import SharedCounts
    name, slot, n, columns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    counts = SharedCounts.attach(name, slots=4, columns=columns)
    row = counts.row(slot)
    print("attached", flush=True)
    for i in range(n):
        row[i % columns] += 1
    print("done", flush=True)
    sys.stdin.readline()  # wait to be told to exit (or killed)
    del row
    counts.close()
    """
)


def _worker(name: str, slot: int, n: int, columns: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, name, str(slot), str(n), str(columns)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _expect(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdout is not None
    got = proc.stdout.readline().strip()
    assert got == line, (
        f"expected {line!r}, got {got!r}; stderr: {proc.stderr and proc.stderr.read()}"
    )


def test_rows_are_summed_and_a_reader_sees_every_slot() -> None:
    counts = SharedCounts.create("sum", slots=3, columns=4)
    try:
        reader = SharedCounts.attach(counts.name, slots=3, columns=4)
        counts.row(0)[:] += 1
        counts.row(2)[3] += 5
        assert reader.total().tolist() == [1, 1, 1, 6]
        assert reader.per_slot().tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 5]]
        with pytest.raises(IndexError, match=r"slot 3 is not one of 0\.\.2"):
            reader.row(3)
        reader.close()
    finally:
        counts.unlink()
    assert owned_by(os.getpid()) == []


def test_attach_checks_the_shape_and_the_name() -> None:
    counts = SharedCounts.create("shape", slots=2, columns=8)
    try:
        with pytest.raises(SharedCountsError, match=r"holds 2 x 8 counts .* not the 2 x 9"):
            SharedCounts.attach(counts.name, slots=2, columns=9)
    finally:
        counts.unlink()
    with pytest.raises(SharedCountsError, match="does not exist"):
        SharedCounts.attach(counts.name, slots=2, columns=8)
    with pytest.raises(ValueError, match="a shared memory tag is"):
        segment_name(1, "a/b")


def test_workers_in_other_processes_add_without_locks_and_a_kill_leaves_nothing() -> None:
    """Three real processes each add 20,000 to their own row at once; the owner's sum is exact.
    One is then killed with -9 and one exits normally: the segment is still there and whole
    (neither unlinked it), and the owner's unlink leaves nothing in /dev/shm."""
    columns, n = 7, 20_000
    counts = SharedCounts.create("workers", slots=4, columns=columns)
    procs = [_worker(counts.name, slot, n, columns) for slot in (0, 1, 3)]
    try:
        for p in procs:
            _expect(p, "attached")
        for p in procs:
            _expect(p, "done")
        per_slot = counts.per_slot()
        assert per_slot.sum(axis=1).tolist() == [n, n, 0, n]
        assert int(counts.total().sum()) == 3 * n
        procs[0].kill()  # kill -9: no close, no atexit
        assert procs[0].wait(DEADLINE_S) == -signal.SIGKILL
        assert procs[1].communicate("\n", timeout=DEADLINE_S)[1] == ""  # no tracker warning
        assert procs[1].returncode == 0
        assert owned_by(os.getpid()) == [counts.name]
        again = _worker(counts.name, 0, 10, columns)  # a restarted worker takes the same slot
        procs.append(again)
        _expect(again, "attached")
        _expect(again, "done")
        assert int(counts.total().sum()) == 3 * n + 10
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(DEADLINE_S)
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()
        counts.unlink()
    assert owned_by(os.getpid()) == []


OWNER = textwrap.dedent(
    """
    from proxy.engine.shared import SharedCounts
    counts = SharedCounts.create("orphan", slots=1, columns=3)
    print(counts.name, flush=True)
    import sys; sys.stdin.readline()
    """
)


def test_what_an_owner_killed_with_its_group_left_is_swept() -> None:
    """An owner killed with -9 together with its resource tracker (a whole process group, as
    a container's kill does) leaves its segment; the next `sweep_stale` removes it and leaves
    segments of live owners alone."""
    mine = SharedCounts.create("alive", slots=1, columns=1)
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert owner.stdout is not None
        name = owner.stdout.readline().strip()
        assert name == segment_name(owner.pid, "orphan")
        os.killpg(owner.pid, signal.SIGKILL)
        owner.wait(DEADLINE_S)
        assert owned_by(owner.pid) == [name]
        removed = sweep_stale()
        assert name in removed
        assert owned_by(owner.pid) == []
        assert owned_by(os.getpid()) == [mine.name]
    finally:
        if owner.poll() is None:
            owner.kill()
        for f in (owner.stdin, owner.stdout):
            if f is not None:
                f.close()
        mine.unlink()
