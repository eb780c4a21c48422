"""Dynamic micro-batching: concurrent requests to one model version share one `session.run`."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter, thread_time
from typing import Any, TypedDict

import numpy as np

from proxy.config.schema import BatchingConfig, LimitsConfig
from proxy.engine.runner import Runner, usable_cpus
from proxy.engine.stats import LatencyHistogram
from proxy.errors import OverloadedError, UpstreamError

log = logging.getLogger("mlproxy.batching")
Array = np.ndarray[Any, Any]
RunFn = Callable[[Array], dict[str, Array]]
Observer = Callable[[Array, dict[str, Array]], None]
COST_SMOOTHING = 0.1  # weight of the newest run in the moving average of a run's cost
SIZE_CLASSES = 8  # batch sizes 1, 2-3, 4-7, ..., 64-127, 128+: a run's cost is mostly fixed


SOLO_CPU_INLINE_MAX_S = 0.001  # with one CPU, runs up to this long stay on the loop


def inline_limit_s(inline_max_us: float, cpus: float) -> float:
    """The measured run cost (s) under which a batch runs on the event loop, not a thread.

    `inline_max_us` when a thread can run beside the loop: there a run that costs more than the
    hand-off (30-90 us) is worth moving. With fewer than two CPUs to run on (CPU affinity, or a
    container's CPU quota), the thread could only take turns with the loop on the same CPU: the
    hand-off buys no parallelism and is pure cost, so runs up to SOLO_CPU_INLINE_MAX_S stay
    inline too (longer ones still go to the thread, so that the loop keeps answering in
    between). `inline_max_us = 0` means every run goes to a thread, whatever the CPUs.
    """
    if inline_max_us <= 0:
        return 0.0
    limit = inline_max_us / 1e6
    return max(limit, SOLO_CPU_INLINE_MAX_S) if cpus < 2 else limit


class BatcherSettings(TypedDict):
    max_batch_size: int
    max_delay_s: float
    inline_max_s: float
    queue_timeout_s: float


def batcher_settings(batching: BatchingConfig, limits: LimitsConfig) -> BatcherSettings:
    """The config's batching and limits as a Batcher's settings (its keyword arguments): the one
    place the config's units become the batcher's."""
    return {
        "max_batch_size": batching.max_batch_size,
        "max_delay_s": batching.max_delay_ms / 1000.0,
        "inline_max_s": inline_limit_s(batching.inline_max_us, usable_cpus()),
        "queue_timeout_s": limits.queue_timeout_ms / 1000.0,
    }


def size_class(rows: int) -> int:
    return min(rows.bit_length() - 1, SIZE_CLASSES - 1)


@dataclass(slots=True)
class _Waiter:
    x: Array
    future: asyncio.Future[dict[str, Array]]
    enqueued: float


@dataclass(slots=True)
class BatchStats:
    """What the batcher did, for metrics: runs, rows, where they ran, requests shed."""

    batches: int = 0
    rows: int = 0
    inline_batches: int = 0
    shed: int = 0
    failed_batches: int = 0
    max_batch_rows: int = 0
    last_wait_s: float = 0.0
    run_cost_s: list[float | None] = field(default_factory=lambda: [None] * SIZE_CLASSES)
    batch_rows_hist: dict[int, int] = field(default_factory=dict)
    queue_wait: LatencyHistogram = field(default_factory=LatencyHistogram)


@dataclass(frozen=True, slots=True)
class BatcherState:
    """What readers (status, metrics, overload watch) see of a batcher: its live counters and
    its queue at the moment of asking."""

    stats: BatchStats
    queue_depth: int
    inline_max_s: float


class Batcher:
    """Merges concurrent requests into one run and splits the results back.

    No timer sits in the common path. When nothing is running, the first request schedules a
    dispatch at the end of the current loop iteration, so every request parsed in the same
    iteration joins it, and a lone request waits for no clock. (Dispatching a lone request at
    once instead was tried: at 7k req/s open-loop it lost the little batching there is and the
    server fell behind, p50 1.5-360 ms.) While a run is in flight on a
    thread, new requests queue and go together when it ends. If that run takes longer than
    `max_delay_s`, queued requests start a second, concurrent run (up to `max_runs`).

    Where a run goes: a thread (`runner`), unless the version's measured cost for batches of
    this size (a moving average per power-of-two size class, in thread CPU time) is below
    `inline_max_s`; then it runs on the event loop, because handing it to a thread and back
    costs more (30-90 us measured on the 2-core benchmark box) than the run itself (7-30 us for
    up to 64 rows of the demo logistic regression). The first run of each size class goes to a
    thread, where it is measured; a slow model never runs inline.

    Requests that waited longer than `queue_timeout_s` are shed with OverloadedError.
    """

    def __init__(
        self,
        run: RunFn,
        *,
        runner: Runner,
        max_batch_size: int,
        max_delay_s: float,
        queue_timeout_s: float,
        inline_max_s: float = 0.0,
        max_runs: int = 2,
        name: str = "model",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._run = run
        self._runner = runner
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue_timeout_s = queue_timeout_s
        self.inline_max_s = inline_max_s
        self.max_runs = max_runs
        self.name = name
        self._clock = clock or perf_counter  # queue waits are sub-millisecond: not uvloop's clock
        self.observer: Observer | None = None  # sees every run's rows and outputs (monitoring)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[_Waiter] = deque()
        self._pending_rows = 0
        self._in_flight = 0
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.stats = BatchStats()

    def configure(self, batching: BatchingConfig, limits: LimitsConfig) -> None:
        """Take new settings (a reload that keeps this version warm)."""
        settings = batcher_settings(batching, limits)
        self.max_batch_size = settings["max_batch_size"]
        self.max_delay_s = settings["max_delay_s"]
        self.inline_max_s = settings["inline_max_s"]
        self.queue_timeout_s = settings["queue_timeout_s"]

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def state(self) -> BatcherState:
        return BatcherState(self.stats, len(self._pending), self.inline_max_s)

    def submit(self, x: Array) -> asyncio.Future[dict[str, Array]]:
        """Queue rows `x`; the future resolves to this request's slice of every output."""
        loop = self._loop
        if loop is None:  # asyncio.get_running_loop() costs a getpid() syscall on every call
            loop = self._loop = asyncio.get_running_loop()
        if self._closed:
            raise UpstreamError(f"{self.name} is shutting down")
        fut: asyncio.Future[dict[str, Array]] = loop.create_future()
        self._pending.append(_Waiter(x, fut, self._clock()))
        self._pending_rows += x.shape[0]
        if self._in_flight == 0:
            if not self._scheduled:
                self._scheduled = True
                loop.call_soon(self._scheduled_flush)
        elif self._in_flight < self.max_runs:
            if self._pending_rows >= self.max_batch_size:
                self.flush()
            elif self._timer is None:
                self._timer = loop.call_later(self.max_delay_s, self._timer_flush)
        return fut

    def _scheduled_flush(self) -> None:
        self._scheduled = False
        if self._in_flight == 0:
            self.flush()

    def _timer_flush(self) -> None:
        self._timer = None
        if self._in_flight < self.max_runs:
            self.flush()

    def flush(self) -> None:
        """Dispatch one batch of what is queued now (the step function tests drive)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self._clock()
        batch: list[_Waiter] = []
        rows = 0
        while self._pending:
            w = self._pending[0]
            n = w.x.shape[0]
            if batch and rows + n > self.max_batch_size:
                break
            self._pending.popleft()
            self._pending_rows -= n
            if w.future.done():  # the client went away
                continue
            wait = now - w.enqueued
            if wait > self.queue_timeout_s:
                self.stats.shed += 1
                w.future.set_exception(
                    OverloadedError(
                        f"{self.name} queue wait {wait * 1000:.0f} ms exceeded limits.queue_timeout_ms"
                    )
                )
                continue
            batch.append(w)
            rows += n
        if not batch:
            return
        self._in_flight += 1
        self._idle.clear()
        self.stats.last_wait_s = now - batch[0].enqueued
        self.stats.queue_wait.observe(self.stats.last_wait_s)
        x = batch[0].x if len(batch) == 1 else np.concatenate([w.x for w in batch])
        cost = self.stats.run_cost_s[size_class(rows)]
        if cost is not None and cost <= self.inline_max_s:
            self.stats.inline_batches += 1
            try:
                outputs = self._timed_run(x)
            except Exception as exc:  # a failed run fails its requests, never the loop
                self._finish(None, exc, batch, rows, x)
            else:
                self._finish(outputs, None, batch, rows, x)
            return
        self._runner.call(
            self._timed_run, x, lambda result, exc: self._finish(result, exc, batch, rows, x)
        )

    def _timed_run(self, x: Array) -> dict[str, Array]:
        # CPU time of this thread, not wall time: a run preempted by the event loop must not
        # look slow, or a cheap model would be kept off the loop by its own measurement.
        start = thread_time()
        outputs = self._run(x)
        cost = thread_time() - start
        costs = self.stats.run_cost_s
        k = size_class(x.shape[0])
        old = costs[k]
        # A list store is atomic under the GIL; a lost update between threads only delays the average.
        costs[k] = cost if old is None else old + COST_SMOOTHING * (cost - old)
        return outputs

    def _finish(
        self,
        outputs: dict[str, Array] | None,
        exc: BaseException | None,
        batch: list[_Waiter],
        rows: int,
        x: Array,
    ) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()
        st = self.stats
        st.batches += 1
        st.rows += rows
        st.max_batch_rows = max(st.max_batch_rows, rows)
        st.batch_rows_hist[rows] = st.batch_rows_hist.get(rows, 0) + 1
        if exc is not None or outputs is None:
            st.failed_batches += 1
            err = UpstreamError(f"{self.name} failed to run a batch of {rows} rows: {exc}")
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(err)
        else:
            if self.observer is not None:
                try:
                    self.observer(x, outputs)
                except Exception:  # monitoring must never fail a request
                    log.exception("monitoring %s failed", self.name)
            start = 0
            for w in batch:
                n = w.x.shape[0]
                if not w.future.done():
                    if len(batch) == 1:
                        w.future.set_result(outputs)
                    else:
                        w.future.set_result({k: v[start : start + n] for k, v in outputs.items()})
                start += n
        if self._pending and not self._closed and self._in_flight < self.max_runs:
            self.flush()

    async def close(self) -> None:
        """Fail what is queued, and wait for runs in flight to end."""
        self._closed = True
        while self._pending:
            w = self._pending.popleft()
            if not w.future.done():
                w.future.set_exception(UpstreamError(f"{self.name} is shutting down"))
        self._pending_rows = 0
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=10.0)
        except TimeoutError:
            pass  # a run stuck in onnxruntime cannot be cancelled; the process exit ends it
