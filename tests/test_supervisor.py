"""The worker processes of `workers = N` (proxy/supervisor.py): real processes serving one real
port on 127.0.0.1 (a SO_REUSEPORT socket each), killed with -9, failing at start, signalled, stopped."""

from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.scaleout import listen
from proxy.supervisor import START_FAILURES_MAX, Workers, _cgroup_quota, usable_cpus

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 20.0

# A worker: accept on the inherited socket and answer every connection with its pid, slot and
# the SIGHUPs it has had; SIGTERM ends it with 0. Bounded: at most 100,000 connections.
WORKER = textwrap.dedent(
    """
    import signal, socket, sys
    fd, slot = int(sys.argv[1]), int(sys.argv[2])
    hups = 0
    def on_hup(*_):
        global hups
        hups += 1
    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket(fileno=fd)
    import os
    for _ in range(100_000):
        try:
            conn, _ = listener.accept()
        except InterruptedError:
            continue
        with conn:
            conn.recv(1024)
            body = f"{os.getpid()} {slot} {hups}".encode()
            conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
    """
)


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    """Two listening sockets on one port (SO_REUSEPORT), one per slot, as the supervisor
    binds them: the kernel spreads new connections over them."""
    socks = listen("127.0.0.1", 0, 2)
    yield socks
    for sock in socks:
        sock.close()


def _workers(socks: list[socket.socket], n: int, script: str = WORKER) -> Workers:
    fds = [s.fileno() for s in socks]
    return Workers(
        n,
        lambda slot: [sys.executable, "-c", script, str(fds[slot]), str(slot)],
        pass_fds=lambda slot: [fds[slot]],
        cwd=str(ROOT),
    )


def _ask(port: int) -> tuple[int, int, int]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
            if b"\r\n\r\n" in data and data.split(b"\r\n\r\n", 1)[1].count(b" ") == 2:
                break
    pid, slot, hups = data.split(b"\r\n\r\n", 1)[1].split()
    return int(pid), int(slot), int(hups)


def _until(what: str, ok: Callable[[], bool], step: Callable[[], object] | None = None) -> None:
    """Poll `ok` (after `step`) until it holds, at most DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if step is not None:
            step()
        if ok():
            return
        time.sleep(0.01)  # a poll interval, not a synchronisation: the deadline decides
    raise AssertionError(f"not within {DEADLINE_S} s: {what}")


def _answers_from_all(port: int, pids: set[int]) -> dict[int, tuple[int, int]]:
    """Ask over new connections until every pid in `pids` answered (at most 500 tries)."""
    seen: dict[int, tuple[int, int]] = {}
    for _ in range(500):
        pid, slot, hups = _ask(port)
        seen[pid] = (slot, hups)
        if pids <= set(seen):
            return seen
    raise AssertionError(f"only {sorted(seen)} of {sorted(pids)} answered in 500 connections")


def test_workers_share_the_port_and_a_killed_one_is_restarted(
    listeners: list[socket.socket],
) -> None:
    port = listeners[0].getsockname()[1]
    workers = _workers(listeners, 2)
    workers.start()
    try:
        first = {s.pid for s in workers.slots}
        assert None not in first and len(first) == 2
        seen = _answers_from_all(port, first)  # type: ignore[arg-type]
        assert sorted(slot for slot, _ in seen.values()) == [0, 1]
        victim = workers.slots[1]
        old = victim.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        _until(
            "the killed worker is restarted", lambda: victim.pid not in (None, old), workers.step
        )
        assert victim.restarts == 1 and victim.last_exit == -signal.SIGKILL
        assert workers.failed is None
        now = {s.pid for s in workers.slots}
        _answers_from_all(port, now)  # type: ignore[arg-type]
        status = workers.status()
        assert [(w["slot"], w["restarts"]) for w in status] == [(0, 0), (1, 1)]
        assert {w["pid"] for w in status} == now
    finally:
        codes = workers.stop()
    assert codes == {0: 0, 1: 0}  # SIGTERM: each exits 0
    assert workers.live() == []


def test_sighup_reaches_every_worker(listeners: list[socket.socket]) -> None:
    port = listeners[0].getsockname()[1]
    workers = _workers(listeners, 2)
    workers.start()
    try:
        pids = {s.pid for s in workers.slots}
        _answers_from_all(port, pids)  # type: ignore[arg-type]  # both are up
        assert workers.signal(signal.SIGHUP) == 2
        seen = _answers_from_all(port, pids)  # type: ignore[arg-type]
        assert all(hups == 1 for _, hups in seen.values()), seen
    finally:
        workers.stop()


def test_a_worker_that_fails_at_start_is_given_up_not_looped(
    listeners: list[socket.socket],
) -> None:
    workers = _workers(listeners, 1, script="import sys; sys.exit(3)")
    workers.start()
    try:
        _until("the slot is given up", lambda: workers.failed is not None, workers.step)
        slot = workers.slots[0]
        assert slot.restarts == START_FAILURES_MAX - 1
        assert workers.failed == (
            f"worker 0 failed at start {START_FAILURES_MAX} times in a row (last exit code 3);"
            " not restarting it"
        )
        for _ in range(5):  # nothing more is started
            workers.step(workers.clock() + 60)
        assert slot.proc is None and slot.restarts == START_FAILURES_MAX - 1
    finally:
        workers.stop()


def test_workers_is_a_positive_number(listeners: list[socket.socket]) -> None:
    with pytest.raises(ValueError, match="workers: 0 is not a number of processes"):
        _workers(listeners, 0)


def test_usable_cpus_honours_a_cgroup_quota(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs: two workers' worth, rounded up
    assert _cgroup_quota(str(cpu_max)) == 2
    cpu_max.write_text("max 100000\n")
    assert _cgroup_quota(str(cpu_max)) is None
    cpu_max.write_text("50000 100000\n")
    assert _cgroup_quota(str(cpu_max)) == 1
    assert _cgroup_quota(str(tmp_path / "absent")) is None
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
