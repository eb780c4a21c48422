"""Threads that run model inference off the event loop, with a cheap hand-off back to it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
Done = Callable[[Any, BaseException | None], None]
log = logging.getLogger("mlproxy.runner")
_STOP = object()
BACKGROUND_NICE = 19  # CFS weight 15 against 1024: background gets ~1.5% of a contended core


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> float:
    """How many CPUs this process can use at once: its CPU affinity, capped by a cgroup v2 CPU
    quota (`cpu.max`, as a container's CPU limit sets it) when there is one."""
    cpus = float(len(os.sched_getaffinity(0)))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max" and float(period) > 0:
            cpus = min(cpus, float(quota) / float(period))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity decides
    return cpus


class Runner:
    """A few threads fed by one queue; `submit` returns an asyncio future.

    Half the cost of `loop.run_in_executor` per hand-off (measured 27 us against 45 us for a
    one-row model on one core): no concurrent.futures.Future to chain, one callback into the
    loop. `nice` > 0 lowers the threads' scheduling priority (Linux per-thread nice), so that
    background work such as shadow mirrors takes only the CPU the serving threads leave.
    """

    def __init__(self, threads: int, *, name: str, nice: int = 0) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, args=(nice,), name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def call(self, fn: Callable[[Any], T], arg: Any, done: Done) -> None:
        """Run fn(arg) on a thread, then done(result, None) or done(None, exc) on this loop."""
        self._queue.put((fn, arg, done, asyncio.get_running_loop()))

    def submit(self, fn: Callable[[Any], T], arg: Any) -> asyncio.Future[T]:
        """Run fn(arg) on a thread; the future resolves on this loop."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.call(fn, arg, lambda result, exc: _set(fut, result, exc))
        return fut

    def _work(self, nice: int) -> None:
        if nice:
            tid = threading.get_native_id()
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                # SCHED_IDLE: the thread runs only when nothing else on its CPU wants to, and a
                # waking serving thread preempts it at once (nice alone still lets it finish
                # its time slice first).
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            except (OSError, AttributeError) as exc:
                log.warning(
                    "cannot lower the priority of %s: %s", threading.current_thread().name, exc
                )
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fn, arg, done, loop = item
            try:
                result = fn(arg)
            except BaseException as exc:
                _deliver(loop, done, None, exc)
            else:
                _deliver(loop, done, result, None)

    def close(self) -> None:
        """Stop the threads after the work already queued (they are daemons: exit never waits)."""
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join(timeout=10)


@dataclass(frozen=True, slots=True)
class Runners:
    """Serving runs (normal priority) and background runs such as shadow mirrors (niced)."""

    serving: Runner
    background: Runner

    @classmethod
    def create(cls, serving_threads: int = 2) -> Runners:
        return cls(
            Runner(serving_threads, name="onnx"), Runner(1, name="mirror", nice=BACKGROUND_NICE)
        )

    def close(self) -> None:
        self.serving.close()
        self.background.close()


def _set(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _deliver(
    loop: asyncio.AbstractEventLoop, done: Done, result: Any, exc: BaseException | None
) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed while a run was in flight
        loop.call_soon_threadsafe(done, result, exc)
