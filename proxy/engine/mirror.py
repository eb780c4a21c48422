"""Shadow traffic: mirrored rows go to a mirror version in batches, never in the primary's way."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from time import perf_counter
from typing import Any, Protocol

import numpy as np

from proxy.engine.breaker import Breaker
from proxy.engine.stats import MirrorStats, compare_outputs

Array = np.ndarray[Any, Any]
log = logging.getLogger("mlproxy.mirror")
# Mirrors are not latency-bound: a mirror batch waits up to LINGER_S to fill up to
# MIRROR_BATCH_ROWS, so that the loop pays for one run and one comparison per ~100 requests.
LINGER_S = 0.02
MIRROR_BATCH_ROWS = 256
# While the serving loop is busy (Serving measures it), a lane mirrors only one request in
# BUSY_KEEP_EVERY: comparisons go on at a trickle (at 5,000 req/s, ~150 a second), and the
# primary pays 1/32 of the mirror's cost. (With 1 in 8, a saturated loop's p50 was 1.12-1.20x
# single's over 30-40 one-second slice pairs; with 1 in 32, 0.96-1.08x, like no mirror at all.)
BUSY_KEEP_EVERY = 32
# ...and batches linger this long instead of LINGER_S: at 90%+ utilisation even the per-batch
# cost (a timer, a thread wake-up, a result callback) shows in every primary's queueing.
BUSY_LINGER_S = 0.2


class Mirror(Protocol):
    """What a lane needs of the version it feeds (models.backends.Backend is one)."""

    @property
    def version(self) -> str: ...

    @property
    def kind(self) -> str: ...

    async def infer(self, x: Array, *, background: bool = False) -> dict[str, Array]: ...


class MirrorLane:
    """Feeds one mirror version: a bounded queue of rows, one batch in flight, a circuit breaker.

    `offer` is synchronous and O(1): the primary's request appends its rows and its answer and
    goes on; when the queue holds `queue_rows` rows, new rows are dropped and counted. A worker
    task drains the queue in batches of up to `max_batch_rows`, one batch in flight at a time,
    and compares the mirror's answers with the primary's. A batch that is not full waits up to
    `linger_s` for more rows, so that under steady traffic the mirror costs one run (and one
    comparison) per `max_batch_rows` requests rather than one per request; its runs go to the
    low-priority background thread. After `breaker_failures` failed or
    timed-out batches in a row its breaker opens: the lane drops everything for
    `breaker_pause_s` seconds, then one batch is the trial that closes it again or reopens it.
    `opened=True` starts the breaker open (a remote mirror that did not answer at load): the
    first trial comes after one pause.

    While `busy` is set (Serving sets it while the serving loop uses nearly all of its CPU), the
    lane takes one request in BUSY_KEEP_EVERY and counts the others as `yielded`: near
    saturation even the loop's small share of a mirror's work (copying rows in, comparing
    answers) lengthens every primary's queue.
    """

    def __init__(
        self,
        backend: Mirror,
        stats: MirrorStats,
        *,
        queue_rows: int,
        max_batch_rows: int,
        timeout_s: float,
        breaker_failures: int,
        breaker_pause_s: float,
        clock: Callable[[], float],
        linger_s: float = LINGER_S,
        opened: bool = False,
    ) -> None:
        self.backend = backend
        self.stats = stats
        self.queue_rows = queue_rows
        self.max_batch_rows = max_batch_rows
        self.timeout_s = timeout_s
        self.breaker = Breaker(
            failures=breaker_failures, pause_s=breaker_pause_s, clock=clock, opened=opened
        )
        if opened:
            stats.breaker_opened += 1
        self.linger_s = linger_s
        self._full = asyncio.Event()
        # The queue: rows [head, tail) of preallocated arrays, one for the inputs and one per
        # primary output, allocated at the first offer. An offer copies its rows in; a batch is
        # copied out in one slice. (A deque of per-request arrays cost the loop a
        # concatenation of ~100 small arrays per output at every batch: 6% of its time at
        # 6,000 req/s.)
        self._x: Array | None = None
        self._out: dict[str, Array] = {}
        self._head = 0
        self._tail = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.busy = False  # set by Serving while the serving loop has no CPU to spare
        self._busy_skip = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def breaker_open(self) -> bool:
        return self.breaker.is_open()

    @property
    def queued_rows(self) -> int:
        return self._tail - self._head

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._work(), name=f"mirror-{self.backend.version}"
            )

    def offer(self, x: Array, primary: dict[str, Array]) -> None:
        n = x.shape[0]
        if self.busy:  # mirrors yield to primaries: keep one request in BUSY_KEEP_EVERY
            self._busy_skip += 1
            if self._busy_skip < BUSY_KEEP_EVERY:
                self.stats.yielded += n
                return
            self._busy_skip = 0
        if self.breaker.is_open():
            self.stats.dropped += n
            return
        queued = self._tail - self._head
        if queued + n > self.queue_rows:
            self.stats.dropped += n
            return
        if not self._append(x, primary, n):
            if queued:  # the primary's output schema changed under queued rows: keep it simple
                self.stats.dropped += n
                return
            self._allocate(x, primary)  # the first offer, or a new schema on an empty queue
            if not self._append(x, primary, n):
                self.stats.dropped += n
                return
        self.stats.sent += n
        if queued + n >= min(self.max_batch_rows, self.queue_rows):
            self._full.set()  # a full batch, or a full queue: waiting longer only drops rows
        self._idle.clear()
        self._wake.set()

    def _append(self, x: Array, primary: dict[str, Array], n: int) -> bool:
        """Copy rows and answers in; False if there is no buffer yet or they do not fit its
        schema (the copy itself is the check: no per-request shape comparisons)."""
        if self._x is None:
            return False
        queued = self._tail - self._head
        if self._tail + n > self.queue_rows:  # slide what is queued back to the start
            self._x[:queued] = self._x[self._head : self._tail]
            for buf in self._out.values():
                buf[:queued] = buf[self._head : self._tail]
            self._head, self._tail = 0, queued
        end = self._tail + n
        try:
            self._x[self._tail : end] = x
            for name, buf in self._out.items():
                buf[self._tail : end] = primary[name]
        except (KeyError, ValueError, TypeError):
            return False
        self._tail = end
        return True

    def _allocate(self, x: Array, primary: dict[str, Array]) -> None:
        rows = self.queue_rows
        self._x = np.empty((rows, *x.shape[1:]), dtype=x.dtype)
        self._out = {k: np.empty((rows, *v.shape[1:]), dtype=v.dtype) for k, v in primary.items()}
        self._head = self._tail = 0

    async def drained(self) -> None:
        """Wait until every offered row has been run (or failed); for tests and shutdown."""
        await self._idle.wait()

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._tail > self._head:
                if self.queued_rows < self.max_batch_rows and self.linger_s > 0:
                    self._full.clear()
                    linger = max(self.linger_s, BUSY_LINGER_S) if self.busy else self.linger_s
                    timer = asyncio.get_running_loop().call_later(linger, self._full.set)
                    await self._full.wait()
                    timer.cancel()
                await self._run_batch()
            self._idle.set()

    def _take_batch(self) -> tuple[Array, dict[str, Array]]:
        """Copy out up to max_batch_rows queued rows and the primary's answers to them."""
        assert self._x is not None
        start = self._head
        end = min(self._tail, start + self.max_batch_rows)
        x = self._x[start:end].copy()
        primary = {k: buf[start:end].copy() for k, buf in self._out.items()}
        self._head = end
        if self._head == self._tail:
            self._head = self._tail = 0
        return x, primary

    def _drop_queued(self) -> int:
        dropped = self._tail - self._head
        self._head = self._tail = 0
        return dropped

    async def _run_batch(self) -> None:
        x, primary = self._take_batch()
        n = x.shape[0]
        if not self.breaker.allow():
            self.stats.dropped += n
            return
        start = perf_counter()
        run = self.backend.infer(x, background=True)
        try:
            if self.backend.kind == "remote":
                out = await asyncio.wait_for(run, timeout=self.timeout_s)
            else:
                # A local mirror runs on our own idle-priority thread: while the serving loop
                # keeps the CPU busy it gets none, by design, so a timeout would only blame the
                # mirror for our load (and open its breaker). Its queue fills and sheds instead.
                out = await run
        except Exception as exc:  # a failed mirror is counted, never raised into serving
            self.stats.failed += n
            if self.breaker.failure():
                self.stats.breaker_opened += 1
                self.stats.dropped += self._drop_queued()
                log.warning(
                    "mirror %s paused for %.1f s after %d failed batches in a row (last: %r)",
                    self.backend.version,
                    self.breaker.pause_s,
                    self.breaker.failures_in_a_row,
                    exc,
                )
            return
        except BaseException:  # cancelled (the lane is closing): no verdict on the mirror
            self.breaker.release()
            raise
        self.breaker.success()
        self.stats.latency.observe(perf_counter() - start)
        compare_outputs(primary, out, self.stats)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._idle.set()
