"""Dynamic micro-batching: concurrent requests to one model version share one `session.run`."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import OverloadedError, UpstreamError

Array = np.ndarray[Any, Any]
RunFn = Callable[[Array], dict[str, Array]]


@dataclass(slots=True)
class _Waiter:
    x: Array
    future: asyncio.Future[dict[str, Array]]
    enqueued: float


@dataclass(slots=True)
class BatchStats:
    """What the batcher did, for metrics: batches, rows, queue waits shed."""

    batches: int = 0
    rows: int = 0
    shed: int = 0
    failed_batches: int = 0
    max_batch_rows: int = 0
    last_wait_s: float = 0.0
    batch_rows_hist: dict[int, int] = field(default_factory=dict)


class Batcher:
    """Merges concurrent requests into one run, off the event loop, and splits the results back.

    No timer sits in the common path: when nothing is running, a request is dispatched on the
    next loop iteration (so requests parsed in the same iteration share a run); while a run is
    in flight, new requests queue and go together in the next run when it ends. If a run takes
    longer than `max_delay_s`, queued requests start a second, concurrent run (up to
    `max_runs`) instead of waiting for it. Requests that waited longer than `queue_timeout_s`
    are shed with OverloadedError instead of being run late.
    """

    def __init__(
        self,
        run: RunFn,
        *,
        executor: Executor | None,
        max_batch_size: int,
        max_delay_s: float,
        queue_timeout_s: float,
        max_runs: int = 2,
        name: str = "model",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue_timeout_s = queue_timeout_s
        self.max_runs = max_runs
        self.name = name
        self._clock = clock
        self._pending: deque[_Waiter] = deque()
        self._pending_rows = 0
        self._in_flight = 0
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.stats = BatchStats()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, x: Array) -> asyncio.Future[dict[str, Array]]:
        """Queue rows `x`; the future resolves to this request's slice of every output."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise UpstreamError(f"{self.name} is shutting down")
        fut: asyncio.Future[dict[str, Array]] = loop.create_future()
        self._pending.append(_Waiter(x, fut, (self._clock or loop.time)()))
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

    async def infer(self, x: Array) -> dict[str, Array]:
        return await self.submit(x)

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
        loop = asyncio.get_running_loop()
        now = (self._clock or loop.time)()
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
        x = batch[0].x if len(batch) == 1 else np.concatenate([w.x for w in batch])
        task = loop.run_in_executor(self._executor, self._run, x)
        task.add_done_callback(lambda t: self._finish(t, batch, rows))

    def _finish(
        self, task: asyncio.Future[dict[str, Array]], batch: list[_Waiter], rows: int
    ) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()
        st = self.stats
        st.batches += 1
        st.rows += rows
        st.max_batch_rows = max(st.max_batch_rows, rows)
        st.batch_rows_hist[rows] = st.batch_rows_hist.get(rows, 0) + 1
        exc = task.exception()
        if exc is not None:
            st.failed_batches += 1
            err = UpstreamError(f"{self.name} failed to run a batch of {rows} rows: {exc}")
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(err)
        else:
            outputs = task.result()
            start = 0
            for w in batch:
                n = w.x.shape[0]
                if not w.future.done():
                    if len(batch) == 1:
                        w.future.set_result(outputs)
                    else:
                        w.future.set_result({k: v[start : start + n] for k, v in outputs.items()})
                start += n
        if self._pending and not self._closed:
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
