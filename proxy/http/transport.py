"""The data plane's server: aiohttp's low-level server with our connections
(`http/connection.py`), the process's admission queue and its timer, the loop-lateness
heartbeat, the connection limit, and a drain that loses no request."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

from aiohttp import web

from proxy.config.schema import LimitsConfig
from proxy.engine.admission import ACTIVE_WINDOWS, REGIME_WINDOW_S, Admission, Hold
from proxy.engine.counters import Counters, Refusal
from proxy.engine.throttle import LogThrottle
from proxy.http.connection import DataProtocol
from proxy.http.refusals import LOG_INTERVAL_S, REFUSALS, SHED_KEEP
from proxy.runtime.current import Current

log = logging.getLogger("mlproxy")
# On drain, an idle keep-alive connection is closed after this long without a new request: a
# request already on the wire when the drain began is answered (with Connection: close).
DRAIN_IDLE_GRACE_S = 0.5
# While connections are open, a heartbeat this often measures how late the loop runs, accepts
# new connections, judges the hold once a window and sheds waiters past their deadline (the
# only timer for them: a deadline is met to within one beat)
HEARTBEAT_S = 0.005
ACCEPT_BATCH = 256  # connections taken from the listening socket per heartbeat, at most
# The fast path's handler: (model, version or None, headers by lower-case name, body) ->
# (status, body, headers); never raises (http/data.py's DataPlane.handle_raw).
RawHandler = Callable[
    [str, str | None, dict[str, str], bytes], Awaitable[tuple[int, bytes, list[tuple[str, str]]]]
]


class DataServer(web.Server):
    """aiohttp's server with our protocol, the process's admission queue and its drain."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        raw: RawHandler | None = None,
        current: Current,
        counters: Counters,
        admission: Admission[Any],
        clock: Callable[[], float] = perf_counter,
    ) -> None:
        limits = current.plan.config.limits
        super().__init__(
            handler,
            access_log=None,
            auto_decompress=False,  # the body reader decodes, bounded by max_body_bytes
            keepalive_timeout=limits.keepalive_timeout_s,
        )
        self.raw = raw  # the fast path's handler (None: every request goes through aiohttp)
        self.current = current
        self.counters = counters
        self.clock = clock
        self.admission = admission
        self.logs = LogThrottle(LOG_INTERVAL_S, clock)
        self.draining = False
        self._limits = limits
        self._open = 0
        self.lag_s = 0.0  # the loop's lateness at the last heartbeat
        self._beat_due = 0.0
        self._beat_handle: asyncio.TimerHandle | None = None
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self.hold = Hold(admission)
        self.window = 0  # the hold's window number (connections note the last they sent in)
        self._window_at = 0.0
        self._listen: socket.socket | None = None  # our own handle on the listening socket
        self._accepting: set[asyncio.Task[Any]] = set()

    def listen_on(self, fd: int) -> None:
        """Also take new connections from the listening socket `fd` at every heartbeat.

        Past capacity the loop's own accept falls behind: measured here, 1,000 new connections
        took 4.2 s to be accepted under wrk -c256 against 0.5 s idle, the kernel's accept queue
        (2,048) filled, and every connection past it lost its SYN and retried after 1, 3, 7 s:
        health probes and new clients waited seconds behind busy ones. The heartbeat runs once
        per loop iteration however many sockets are ready, so accepting there bounds how long a
        new connection waits to about one iteration."""
        sock = socket.socket(fileno=os.dup(fd))
        sock.setblocking(False)
        self._listen = sock

    def stop_accepting(self) -> None:
        """Close our handle on the listening socket (before the site closes its own: the
        socket listens until every handle on it is closed)."""
        sock, self._listen = self._listen, None
        if sock is not None:
            sock.close()

    def _accept_pending(self, sock: socket.socket) -> None:
        loop = self._loop
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, or the socket closed under us
                n = self.logs.hit("accept")
                if n is not None:
                    log.warning("accepting connections failed %d time(s): %s", n, exc)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(loop.connect_accepted_socket(self, conn))
            self._accepting.add(task)
            task.add_done_callback(self._accepted)

    def _accepted(self, task: asyncio.Task[Any]) -> None:
        self._accepting.discard(task)
        if not task.cancelled():
            task.exception()  # a client gone before its transport was made: nothing to serve

    def _beat(self) -> None:
        """Every HEARTBEAT_S while connections are open: how late the loop got to this timer,
        which is about how long the bytes read in this iteration waited unread (the kernel's
        queue, invisible otherwise: past capacity the loop saturates before any count grows)."""
        now = self.clock()
        self.lag_s = max(now - self._beat_due, 0.0)
        if self._open <= 0:
            self._beat_handle = None
            self.lag_s = 0.0
            self.hold.idle()
            return
        self._beat_due = now + HEARTBEAT_S
        self._beat_handle = self._loop.call_later(HEARTBEAT_S, self._beat)
        if self._listen is not None:
            self._accept_pending(self._listen)
        a = self.admission
        a.limit.beat(self.lag_s)
        if now - self._window_at >= REGIME_WINDOW_S:
            window = self.window
            self.window += 1
            self._window_at = now
            self.hold.judge(now, lambda: self._census(window))
            a.limit.window(held=a.held)
        self.hold.check(now)
        if a.waiting and a.next_due_s(now) <= 0.0:
            self._dispatch()  # the oldest waiter's deadline passed (the only timer for it)

    def _census(self, window: int) -> tuple[int, int]:
        """(connections idle through `window`, connections active in the last ACTIVE_WINDOWS
        or with a request waiting or running: one held longer is still a client)."""
        spare = active = 0
        recent = window - ACTIVE_WINDOWS
        for conn in self._connections:
            if isinstance(conn, DataProtocol):
                idle = conn.spare(window)
                if not idle or conn.seen >= recent:
                    active += 1
                    spare += idle
        return spare, active

    def __call__(self) -> DataProtocol:
        return DataProtocol(self, loop=self._loop, **self._kwargs)

    @property
    def open_connections(self) -> int:
        return self._open

    def limits(self) -> LimitsConfig:
        """The limits of the plan in force (a reload's new ones apply to the next request)."""
        limits = self.current.plan.config.limits
        if limits is not self._limits:
            self._limits = limits
            self.admission.configure(
                ceiling=limits.max_inflight,
                adaptive=limits.adaptive,
                deadline_s=limits.queue_timeout_ms / 1000.0,
            )
        return limits

    # ---------------------------------------------------------------- connections

    def opened(self) -> bool:
        """A connection was made; False if it is one past limits.max_connections."""
        self._open += 1
        self.hold.opened(self.clock())
        self._all_closed.clear()
        if self._beat_handle is None:
            self._beat_due = self.clock() + HEARTBEAT_S
            self._beat_handle = self._loop.call_later(HEARTBEAT_S, self._beat)
        return self._open <= self.limits().max_connections

    def closed(self) -> None:
        self._open -= 1
        if self._open <= 0:
            self._all_closed.set()

    # ---------------------------------------------------------------- admission

    def refusing(self, conn: DataProtocol) -> bool:
        """Would a request arriving on `conn` now be refused at once (see `arrive`)?"""
        if self.draining:
            return False
        a = self.admission
        return a.full or self._late(self.clock())

    def refuse_raw(self) -> None:
        self.admission.refuse()
        self._count_shed()

    def _late(self, now: float) -> bool:
        """The loop was later than a request may wait: a request read now sat unread in the
        socket for about as long, past its deadline already. Never while the clients are held
        (each refused would resend at once, a new arrival)."""
        a = self.admission
        return not a.held and self.lag_s >= a.max_wait_s(now)

    def arrive(self, conn: DataProtocol) -> bool | None:
        """May `conn`'s request run? (see Admission.arrive)"""
        self.limits()
        if self.draining:
            self.admission.take()  # a drain refuses nothing already received
            return True
        a = self.admission
        now = self.clock()
        if self._late(now):  # refused now, for the price of a canned answer
            a.refuse()
            self._count_shed()
            return None
        verdict = a.arrive(conn, now - self.lag_s, now)
        if verdict is None:
            self._count_shed()
        return verdict

    def release(self, latency_s: float) -> None:
        admission = self.admission
        admission.release(latency_s)
        if admission.waiting:
            self._dispatch()

    def cancel(self, conn: DataProtocol) -> None:
        self.admission.cancel(conn)

    def _run_all(self) -> None:
        for conn in self.admission.admit_all():
            conn.admitted()

    def _dispatch(self) -> None:
        run, shed = self.admission.due(self.clock())
        for conn in run:
            conn.admitted()
        for conn in shed:
            conn.shed(SHED_KEEP)
            self._count_shed()

    def _count_shed(self) -> None:
        self.counters.shed()
        n = self.logs.hit("shed")
        if n is not None:
            a = self.admission
            log.warning(
                "shedding load: %d request(s) refused with 503 since the last message"
                " (admission limit %d, %d running, %d waiting)",
                n,
                a.limit.limit,
                a.inflight,
                a.waiting,
            )

    def refused(self, why: Refusal) -> None:
        """A connection-level refusal (timeout, too many connections, malformed HTTP)."""
        self.counters.refused(why)
        n = self.logs.hit(why)
        if n is not None:
            log.warning("%s: %d connection(s) since the last message", REFUSALS[why], n)

    # ---------------------------------------------------------------- drain

    def start_drain(self) -> None:
        """Answer every request already received with Connection: close; idle connections close
        after DRAIN_IDLE_GRACE_S. Waiting requests run at once (a drain refuses none)."""
        self.draining = True
        self.current.drain()  # every answer from now on carries Connection: close
        self._run_all()
        for conn in list(self._connections):
            if isinstance(conn, DataProtocol):
                conn.drain(DRAIN_IDLE_GRACE_S)

    async def connections_closed(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._all_closed.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
