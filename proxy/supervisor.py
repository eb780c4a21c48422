"""Worker processes for `workers = N`: start them, restart the dead, forward signals, stop all.

The supervisor side of DESIGN section 7, without the serving: `Workers` runs N copies of a
command, each a fresh interpreter (`subprocess`, never a fork of a process that already has an
event loop, an onnxruntime session or a thread), each handed the listening socket (`pass_fds`)
and its slot number. It is a step machine with the clock passed in: `step(now)` reaps the dead
and restarts what is due, so tests drive it by polling with a deadline, not by sleeping.

Restarts: a worker that dies is started again after a backoff that doubles per death of that
slot (RESTART_BACKOFF_S up to RESTART_BACKOFF_MAX_S) and resets once a worker has lived
HEALTHY_AFTER_S. A worker that dies within START_GRACE_S of its start failed at start (a bad
config, a port, a missing model): after START_FAILURES_MAX such deaths in a row the slot is
given up and `failed` says why, so the supervisor exits with the reason instead of looping.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

RESTART_BACKOFF_S = 0.1
RESTART_BACKOFF_MAX_S = 5.0
HEALTHY_AFTER_S = 10.0  # a worker that lived this long resets its slot's backoff
START_GRACE_S = 2.0  # a worker dead sooner than this after its start failed at start
START_FAILURES_MAX = 3  # failed starts in a row before the slot is given up
STOP_TIMEOUT_S = 15.0  # SIGTERM, then this long to drain, then SIGKILL

# slot -> the command line of the worker for that slot
Command = Callable[[int], Sequence[str]]


@dataclass(slots=True)
class Slot:
    """One worker's place: its process now, when it started, how often it was restarted."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0  # the clock's time of the current process's start
    started_unix: float = 0.0  # the same, as Unix seconds (status)
    restarts: int = 0
    backoff_s: float = RESTART_BACKOFF_S
    due: float | None = None  # when a dead worker is started again
    failed_starts: int = 0
    last_exit: int | None = None  # the returncode of the last worker that died here

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid


class Workers:
    """N worker processes, restarted when they die (see the module docstring)."""

    def __init__(
        self,
        n: int,
        command: Command,
        *,
        pass_fds: Sequence[int] | Callable[[int], Sequence[int]] = (),
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if n < 1:
            raise ValueError(f"workers: {n} is not a number of processes (1 or more)")
        self.command = command
        self.pass_fds = pass_fds  # every worker's, or slot -> that slot's
        self.env = env
        self.cwd = cwd
        self.clock = clock
        self.slots = [Slot(i) for i in range(n)]
        self.failed: str | None = None  # why a slot was given up (the supervisor then exits)
        self.stopping = False

    def start(self) -> None:
        """Start every slot's worker."""
        now = self.clock()
        for slot in self.slots:
            self._spawn(slot, now)

    def _spawn(self, slot: Slot, now: float) -> None:
        slot.proc = subprocess.Popen(
            list(self.command(slot.index)),
            pass_fds=tuple(self.pass_fds(slot.index) if callable(self.pass_fds) else self.pass_fds),
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
        )
        slot.started_at = now
        slot.started_unix = time.time()
        slot.due = None

    def step(self, now: float | None = None) -> list[Slot]:
        """Reap dead workers and start those whose backoff has passed; returns the slots whose
        worker died in this step."""
        now = self.clock() if now is None else now
        died: list[Slot] = []
        for slot in self.slots:
            proc = slot.proc
            if proc is not None and proc.poll() is not None:
                died.append(slot)
                self._died(slot, proc.returncode, now)
            elif proc is None and slot.due is not None and now >= slot.due and not self.stopping:
                slot.restarts += 1
                self._spawn(slot, now)
        return died

    def _died(self, slot: Slot, returncode: int, now: float) -> None:
        slot.proc = None
        slot.last_exit = returncode
        if self.stopping:
            return
        lived = now - slot.started_at
        if lived < START_GRACE_S:
            slot.failed_starts += 1
            if slot.failed_starts >= START_FAILURES_MAX:
                self.failed = (
                    f"worker {slot.index} failed at start {slot.failed_starts} times in a row"
                    f" (last exit {_describe(returncode)}); not restarting it"
                )
                return
        else:
            slot.failed_starts = 0
        if lived >= HEALTHY_AFTER_S:
            slot.backoff_s = RESTART_BACKOFF_S
        slot.due = now + slot.backoff_s
        slot.backoff_s = min(2 * slot.backoff_s, RESTART_BACKOFF_MAX_S)

    def live(self) -> list[Slot]:
        """The slots with a running worker."""
        return [s for s in self.slots if s.proc is not None and s.proc.poll() is None]

    def signal(self, sig: signal.Signals) -> int:
        """Send `sig` to every live worker (SIGHUP: reload); returns how many got it."""
        sent = 0
        for slot in self.live():
            assert slot.proc is not None
            try:
                slot.proc.send_signal(sig)
            except ProcessLookupError:
                continue
            sent += 1
        return sent

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> dict[int, int]:
        """SIGTERM every worker (each drains its own connections), wait up to `timeout_s` in
        all, then SIGKILL what is left; returns each slot's exit code."""
        self.stopping = True
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes: dict[int, int] = {}
        for slot in self.slots:
            proc = slot.proc
            if proc is None:
                if slot.last_exit is not None:
                    codes[slot.index] = slot.last_exit
                continue
            try:
                proc.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            codes[slot.index] = proc.returncode
            slot.proc = None
            slot.last_exit = proc.returncode
        return codes

    def status(self) -> list[dict[str, object]]:
        """One entry per live worker: pid, slot, start (Unix seconds), restarts."""
        return [
            {
                "pid": s.pid,
                "slot": s.index,
                "started_at": round(s.started_unix, 3),
                "restarts": s.restarts,
            }
            for s in self.live()
        ]


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota
    (`cpu.max`, rounded up), at least 1 (`workers = 0` starts this many)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, quota)
    return max(cpus, 1)


def _cgroup_quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """The CPU quota of this cgroup (v2) in whole CPUs, rounded up; None without one."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(-(-int(quota) // int(period)), 1)
    except (ValueError, ZeroDivisionError):
        return None
