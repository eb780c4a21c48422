"""The data plane's connections: admission before any request object exists, header and body
timeouts, the connection limit, a drain that loses no request, and errors logged without the
client's bytes.

aiohttp's `RequestHandler` parses each connection's bytes into messages and builds a request
and a handler task per message; that build, not the model, is most of a request's cost. So
admission (`engine/admission.py`) acts in `data_received`, on the parsed message: a request
that may not run yet waits as a message (no request object, no task), and one refused gets a
canned 503 written to the transport. Health probes are never held or refused.

This subclasses aiohttp's protocol and touches its private state (`_messages`, `_waiter`,
`_request_in_progress`, `_keepalive_timeout`, `_process_keepalive`); pyproject pins aiohttp's
minor version for it, and tests/test_transport.py and tests/test_shutdown.py exercise every
path over real sockets. The data plane's handler gives the slot back (`request_done`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from proxy.config.schema import LimitsConfig
from proxy.engine.admission import PARKED_PER_SLOT, Admission
from proxy.engine.counters import Counters, Refusal
from proxy.engine.throttle import LogThrottle
from proxy.runtime.current import Current

log = logging.getLogger("mlproxy")
HEALTH_PREFIX = "/v2/health/"
# A body up to this size is waited for before the request takes a slot (a stalled body then
# holds no slot); a bigger one is admitted at its headers, as the reader's buffer would fill.
HOLD_BODY_MAX = 1 << 16
# On drain, an idle keep-alive connection is closed after this long without a new request: a
# request already on the wire when the drain began is answered (with Connection: close).
DRAIN_IDLE_GRACE_S = 0.5
LOG_INTERVAL_S = 10.0
HEARTBEAT_S = 0.005  # how often the loop's lateness is measured while connections are open
RESEND_WINDOW_S = 1.0  # a request this soon after its connection's 503 ignored Retry-After: 1
Message = tuple[Any, StreamReader]


def _canned(status: int, reason: str, error: str, *, close: bool, retry: bool = False) -> bytes:
    body = orjson.dumps({"error": error})
    head = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if retry:
        head.append("Retry-After: 1")
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_SHED = "overloaded: the request waited limits.queue_timeout_ms for a slot; retry after 1 s"
SHED_KEEP = _canned(503, "Service Unavailable", _SHED, close=False, retry=True)
SHED_CLOSE = _canned(503, "Service Unavailable", _SHED, close=True, retry=True)
_FULL = (
    "overloaded: the request could not be admitted in time (limits.queue_timeout_ms) or too"
    " many wait (limits.max_inflight); retry after 1 s"
)
FULL = _canned(503, "Service Unavailable", _FULL, close=False, retry=True)
FULL_CLOSE = _canned(503, "Service Unavailable", _FULL, close=True, retry=True)
TOO_MANY_CONNECTIONS = _canned(
    503,
    "Service Unavailable",
    "too many open connections (limits.max_connections); retry after 1 s",
    close=True,
    retry=True,
)
HEADER_TIMEOUT = _canned(
    408,
    "Request Timeout",
    "the request's headers did not arrive within limits.header_timeout_s",
    close=True,
)
BODY_TIMEOUT = _canned(
    408,
    "Request Timeout",
    "the request's body did not arrive within limits.body_timeout_s",
    close=True,
)


_REFUSALS = {
    Refusal.HEADER_TIMEOUT: "headers not finished within limits.header_timeout_s (408)",
    Refusal.BODY_TIMEOUT: "body not finished within limits.body_timeout_s (408)",
    Refusal.TOO_MANY_CONNECTIONS: "connections past limits.max_connections (503)",
    Refusal.MALFORMED_HTTP: "requests that do not parse as HTTP/1.1 (400)",
    Refusal.CLIENT_DISCONNECTED: "clients that left before their answer",
}


class BodyTimeoutError(Exception):
    """Set on a request body that stalled past limits.body_timeout_s (the reader sees it)."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(f"the body stalled past {limit_s:g} s")
        self.limit_s = limit_s


class ScrubHttpErrors(logging.Filter):
    """For aiohttp's own server logger (the admin plane's): a request that does not parse is
    logged as a count, at most once per LOG_INTERVAL_S, without its exception text or traceback
    (they quote the request's bytes: a token). Other errors pass unchanged."""

    def __init__(self, clock: Callable[[], float] = perf_counter) -> None:
        super().__init__()
        self._logs = LogThrottle(LOG_INTERVAL_S, clock)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        n = self._logs.hit(type(exc).__name__)
        if n is None:
            return False
        record.msg = "%d request(s) that do not parse as HTTP/1.1 (%s) since the last message"
        record.args = (n, _malformed(exc))
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        return True


def _malformed(exc: BaseException | None) -> str:
    """What was wrong with an unparseable request, without repeating its bytes."""
    if isinstance(exc, LineTooLong):
        return "a request line or header is too long"
    name = type(exc).__name__ if exc is not None else "BadHttpMessage"
    return f"it does not parse as HTTP/1.1 ({name})"


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,12})[ \t]*(?:\r\n|$)")


def one_plain_request(data: bytes) -> bool | None:
    """If `data` is exactly one whole, plain HTTP/1.x request (no chunking, upgrade, folded or
    repeated Content-Length, not a health probe): whether it asks to close; else None (let
    aiohttp parse it)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[:end]
    line_end = head.find(b"\r\n")
    parts = (head if line_end < 0 else head[:line_end]).split(b" ")
    if len(parts) != 3 or parts[1].startswith(b"/v2/health/"):
        return None
    version = parts[2]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or b"\r\n " in head or b"\r\n\t" in head:
        return None
    lower = head.lower()
    if b"\r\ntransfer-encoding:" in lower or b"\r\nupgrade:" in lower:
        return None
    lengths = _CONTENT_LENGTH.findall(lower)
    if len(lengths) > 1 or lower.count(b"\r\ncontent-length:") != len(lengths):
        return None
    if end + 4 + (int(lengths[0]) if lengths else 0) != len(data):
        return None
    if version == b"HTTP/1.0":
        return b"\r\nconnection: keep-alive" not in lower
    return b"\r\nconnection: close" in lower


class DataServer(web.Server):
    """aiohttp's server with our protocol, the process's admission queue and its drain."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
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
        self.current = current
        self.counters = counters
        self.clock = clock
        self.admission = admission
        self.logs = LogThrottle(LOG_INTERVAL_S, clock)
        self.draining = False
        self._limits = limits
        self._timer: asyncio.TimerHandle | None = None
        self._open = 0
        self.lag_s = 0.0  # the loop's lateness at the last heartbeat
        self._beat_due = 0.0
        self._beat_handle: asyncio.TimerHandle | None = None
        self._all_closed = asyncio.Event()
        self._all_closed.set()

    def _beat(self) -> None:
        """Every HEARTBEAT_S while connections are open: how late the loop got to this timer,
        which is about how long the bytes read in this iteration waited unread (the kernel's
        queue, invisible otherwise: past capacity the loop saturates before any count grows)."""
        now = self.clock()
        self.lag_s = max(now - self._beat_due, 0.0)
        if self._open <= 0:
            self._beat_handle = None
            self.lag_s = 0.0
            return
        self._beat_due = now + HEARTBEAT_S
        self._beat_handle = self._loop.call_later(HEARTBEAT_S, self._beat)

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
        if a.waiting >= PARKED_PER_SLOT * a.limit.ceiling:
            return True
        return self.lag_s >= a.deadline_s and self.clock() - conn.shed_at > RESEND_WINDOW_S

    def refuse_raw(self) -> None:
        self.admission.shed_total += 1
        self._count_shed()

    def arrive(self, conn: DataProtocol) -> bool | None:
        """May `conn`'s request run? (see Admission.arrive)"""
        self.limits()
        if self.draining:
            self.admission.take()  # a drain refuses nothing already received
            return True
        lag = self.lag_s
        now = self.clock()
        patient = now - conn.shed_at <= RESEND_WINDOW_S
        if lag >= self.admission.deadline_s and not patient:
            # The loop was this late: the request sat unread in the socket for about as long,
            # past its deadline already. Refuse it now, for the price of a canned answer. Not
            # when its connection was refused a moment ago: a client that resends at once
            # (closed loop) would make each refusal a new arrival; it waits its turn instead.
            self.admission.shed_total += 1
            self._count_shed()
            return None
        verdict = self.admission.arrive(conn, now - lag, patient=patient)
        if verdict is False:
            self._arm()
        elif verdict is None:
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
        if self.admission.waiting:
            self._arm()

    def _arm(self) -> None:
        """A timer for the oldest waiter's deadline, in case no request finishes before it."""
        if self._timer is None:
            wait = self.admission.deadline_s - self.admission.oldest_wait_s(self.clock())
            self._timer = self._loop.call_later(max(wait, 0.001), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

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
            log.warning("%s: %d connection(s) since the last message", _REFUSALS[why], n)

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


class DataProtocol(RequestHandler):
    """One client connection (see the module docstring for what it adds to aiohttp's)."""

    __slots__ = (
        "_body_ready",
        "_body_timer",
        "_feeding",
        "_header_timer",
        "_held",
        "_held_body",
        "_server",
        "_slot_at",
        "shed_at",
    )

    def __init__(self, server: DataServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._server = server
        self._held: list[Message] | None = None  # messages not yet handed to aiohttp
        self._held_body = False  # True: held until the first one's body is complete
        self._slot_at = 0.0  # when the request about to run or running took its slot
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._feeding = False  # inside aiohttp's parser (its callbacks must not wake anything)
        self._body_ready = False  # a held body completed while feeding
        self.shed_at = -RESEND_WINDOW_S  # when this connection's last request was shed

    # ---------------------------------------------------------------- connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        srv = self._server
        self._keepalive_timeout = srv.limits().keepalive_timeout_s
        super().connection_made(transport)
        if not srv.opened():
            self._write(TOO_MANY_CONNECTIONS)
            srv.refused(Refusal.TOO_MANY_CONNECTIONS)
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        srv = self._server
        if self._held is not None:
            if not self._held_body:
                srv.cancel(self)
            self._held = None
        elif self._slot_at and not self._request_in_progress:
            self._slot_at = 0.0  # admitted, never started
            srv.release(0.0)
        self._cancel_timers()
        super().connection_lost(exc)
        srv.closed()

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---------------------------------------------------------------- reading

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        if (
            self._server.refusing(self)
            and self._held is None
            and not self._messages
            and not self._request_in_progress
            and self._header_timer is None
            and self._body_timer is None
        ):
            close = one_plain_request(data)
            if close is not None:
                # Refused from the raw bytes: aiohttp's parser never builds this message
                # (headers, URL, body reader), so a refusal costs little more than its write.
                self._server.refuse_raw()
                self.shed_at = self._server.clock()
                if close:
                    self._write(FULL_CLOSE)
                    self.force_close()
                else:
                    self._write(FULL)
                    self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
                return
        messages = self._messages
        before = len(messages)
        waiter = self._waiter
        self._waiter = None  # parse without waking the loop that builds requests
        self._feeding = True
        try:
            super().data_received(data)
        finally:
            self._waiter = waiter
            self._feeding = False
        if len(messages) > before:
            self._arrived(before)
        elif data and self._held is None and self._header_timer is None and self._between():
            self._header_timer = self._loop.call_later(
                self._server.limits().header_timeout_s, self._on_header_timeout
            )
        if self._body_ready:
            self._body_ready = False
            self._body_complete()
        if messages and self._held is None:
            self._wake()

    def _arrived(self, before: int) -> None:
        """Messages were parsed: hold, admit or pass on the first of a quiet connection's."""
        messages = self._messages
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        last_payload = messages[-1][1]
        if not last_payload.is_eof():
            self._watch_body(last_payload)
        if self._held is not None:  # pipelined behind a held request: keep their order
            self._held.extend(messages)
            messages.clear()
            return
        if before or self._request_in_progress:
            return  # pipelined behind a running request: aiohttp answers them in order
        msg, payload = messages[0]
        if type(msg) is not RawRequestMessage or msg.path.startswith(HEALTH_PREFIX):
            return  # a parse error's answer, or a probe: never held, never shed
        if not payload.is_eof():
            length = msg.headers.get("Content-Length", "")
            if length.isdigit() and int(length) <= HOLD_BODY_MAX:
                self._hold(body=True)
                payload.on_eof(self._on_body_eof)
                return
        self._admit()

    def _between(self) -> bool:
        """True when new bytes start a request (no request's body is being read)."""
        return self._body_timer is None

    def _hold(self, *, body: bool) -> None:
        self._held = list(self._messages)
        self._messages.clear()
        self._held_body = body

    def _admit(self) -> bool:
        """Ask admission for the first message; False when it is held or was refused."""
        verdict = self._server.arrive(self)
        if verdict:
            self._slot_at = self._server.clock()
            return True
        if verdict is False:
            if self._held is None:
                self._hold(body=False)
            else:
                self._held_body = False
            return False
        if self._held is None:
            self._hold(body=False)
        self.shed(FULL)
        return False

    def _on_body_eof(self) -> None:
        if self._feeding:  # inside the parser: finish in data_received, after it
            self._body_ready = True
        else:
            self._body_complete()

    def _body_complete(self) -> None:
        """The held request's body is all here: now it asks for a slot."""
        if self._held is None or not self._held_body or self._force_close:
            return
        if self._admit():
            self.admitted(slot_taken=True)

    def admitted(self, *, slot_taken: bool = False) -> None:
        """Admission let the held request run (it holds a slot)."""
        held = self._held
        if held is None:  # gone meanwhile: give the slot back
            self._server.release(0.0)
            return
        if not slot_taken:
            self._slot_at = self._server.clock()
        self._held = None
        self._held_body = False
        self._messages.extend(held)
        self._wake()

    def shed(self, answer: bytes) -> None:
        """Refuse the held request with a canned `answer` (SHED_KEEP or FULL); later pipelined
        ones go on. The connection closes after it when the client asked, the drain runs, or
        the body is not all read (the rest would be taken for the next request)."""
        held = self._held
        self._held = None
        self._held_body = False
        if not held:
            return
        msg, payload = held[0]
        self.shed_at = self._server.clock()
        if self._server.draining or msg.should_close or not payload.is_eof():
            self._write(SHED_CLOSE if answer is SHED_KEEP else FULL_CLOSE)
            self.force_close()
            return
        self._write(answer)
        self._messages.extend(held[1:])
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        if self._messages:
            self._wake()

    # ---------------------------------------------------------------- timeouts

    def _watch_body(self, payload: StreamReader) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self._loop.call_later(
            self._server.limits().body_timeout_s, self._on_body_timeout, payload
        )
        payload.on_eof(self._body_done)

    def _body_done(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _on_body_timeout(self, payload: StreamReader) -> None:
        self._body_timer = None
        if payload.is_eof():
            return
        self._server.refused(Refusal.BODY_TIMEOUT)
        if self._request_in_progress:
            # The handler is reading it: the reader raises, the handler answers 408.
            payload.set_exception(BodyTimeoutError(self._server.limits().body_timeout_s))
            return
        if self._held is not None:
            if not self._held_body:
                self._server.cancel(self)
            self._held = None
        elif self._slot_at:
            self._slot_at = 0.0
            self._server.release(0.0)
        self._write(BODY_TIMEOUT)
        self.force_close()

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self._request_in_progress or self._messages or self._held is not None:
            return  # a request is being answered; its successor's headers may follow it
        self._server.refused(Refusal.HEADER_TIMEOUT)
        self._write(HEADER_TIMEOUT)
        self.force_close()

    def _process_keepalive(self) -> None:
        if self._held is not None:  # waiting for a slot is not idle
            self._keepalive_handle = self._loop.call_later(
                self._keepalive_timeout, self._process_keepalive
            )
            return
        super()._process_keepalive()

    # ---------------------------------------------------------------- answering

    def request_done(self) -> None:
        """The data plane's handler finished the request that held this connection's slot."""
        at = self._slot_at
        if at:
            self._slot_at = 0.0
            srv = self._server
            srv.release(srv.clock() - at)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (or a handler's escaped error): a
        JSON error that says what was wrong, logged as a count, never with the request's bytes
        (its exception text quotes them: a body, a token)."""
        if status >= 500:
            log.error("error serving a request", exc_info=exc)
            error = "internal error; the proxy logged the details"
        else:
            self._server.refused(Refusal.MALFORMED_HTTP)
            error = f"malformed HTTP request: {_malformed(exc)}"
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent on this connection")
        resp = web.Response(
            status=status, body=orjson.dumps({"error": error}), content_type="application/json"
        )
        resp.force_close()
        return resp

    # ---------------------------------------------------------------- drain

    def drain(self, grace_s: float) -> None:
        """Close this connection once idle: now plus `grace_s` if it is idle now."""
        if self._request_in_progress or self._messages or self._held is not None:
            return  # its answer carries Connection: close
        self._loop.call_later(grace_s, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if not (self._request_in_progress or self._messages or self._held is not None):
            # close() alone only stops the loop waiting for a request: close the socket too
            self.force_close()
