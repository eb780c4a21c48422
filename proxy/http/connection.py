"""One data-plane client connection: aiohttp's protocol with admission on the parsed message,
header and body timeouts, a canned refusal from the raw bytes, and the drain's close.

aiohttp's `RequestHandler` parses each connection's bytes into messages and builds a request
and a handler task per message; that build, not the model, is most of a request's cost. So
admission (`engine/admission.py`, through `DataServer`) acts in `data_received`, on the parsed
message: a request that may not run yet waits as a message (no request object, no task), and
one refused gets a canned 503 written to the transport. Health probes are never held or
refused.

This subclasses aiohttp's protocol and touches its private state (`_messages`, `_waiter`,
`_request_in_progress`, `_keepalive_timeout`, `_process_keepalive`); pyproject pins aiohttp's
minor version for it, and tests/test_transport.py and tests/test_shutdown.py exercise every
path over real sockets. The data plane's handler gives the slot back (`request_done`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from proxy.engine.counters import Refusal
from proxy.http.fastpath import PlainInfer, plain_infer, raw_answer
from proxy.http.refusals import (
    BODY_TIMEOUT,
    FULL,
    FULL_ANSWERS,
    FULL_CLOSE,
    HEADER_TIMEOUT,
    HEALTH,
    SHED_CLOSE,
    SHED_KEEP,
    TOO_MANY_CONNECTIONS,
    BodyTimeoutError,
    health_probe,
    malformed,
    one_plain_request,
)

if TYPE_CHECKING:
    from proxy.http.transport import DataServer

log = logging.getLogger("mlproxy")
HEALTH_PREFIX = "/v2/health/"
# A body up to this size is waited for before the request takes a slot (a stalled body then
# holds no slot); a bigger one is admitted at its headers, as the reader's buffer would fill.
HOLD_BODY_MAX = 1 << 16
Message = tuple[Any, StreamReader]


class DataProtocol(RequestHandler):
    """One client connection (see the module docstring for what it adds to aiohttp's)."""

    __slots__ = (
        "_body_ready",
        "_body_timer",
        "_feeding",
        "_header_timer",
        "_held",
        "_held_body",
        "_parked",
        "_raw_busy",
        "_raw_pending",
        "_raw_task",
        "_server",
        "_slot_at",
        "seen",
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
        self._raw_busy = False  # a fast-path request is being answered (aiohttp knows nothing)
        self._raw_pending = b""  # bytes that came meanwhile (pipelined), read after its answer
        self._raw_task: asyncio.Task[None] | None = None  # (the loop keeps only a weak one)
        self._parked: PlainInfer | None = None  # a fast-path request waiting for a slot
        self._body_ready = False  # a held body completed while feeding
        self.seen = server.window  # the last regime window this connection sent bytes in

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
        if self._parked is not None:
            self._parked = None
            srv.cancel(self)
        elif self._held is not None:
            if not self._held_body:
                srv.cancel(self)
            self._held = None
        elif self._slot_at and not self._request_in_progress and not self._raw_busy:
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

    def _answer_raw(self, answers: tuple[bytes, bytes], close: bool) -> None:
        """Write a canned answer, (keep-alive, close), for a request never parsed."""
        self._answer_bytes(answers[close], close)

    def _answer_bytes(self, answer: bytes, close: bool) -> None:
        """Write an answer aiohttp never saw; then close, or restart the keep-alive clock."""
        self._write(answer)
        if close:
            self.force_close()
        else:
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout

    # ---------------------------------------------------------------- reading

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        self.seen = self._server.window
        if self._raw_busy:  # after the fast-path request's answer, in order
            self._raw_pending += data
            return
        quiet = (
            self._held is None
            and not self._messages
            and not self._request_in_progress
            and self._header_timer is None
            and self._body_timer is None
        )
        if quiet and data.startswith(b"GET /v2/health/"):
            probe = health_probe(data)
            if probe is not None:
                # Answered from the raw bytes, in this loop iteration: through aiohttp a probe
                # waits one more (its handler task), about 64 requests' worth at wrk -c64.
                target, asks_close = probe
                self._answer_raw(HEALTH[target], asks_close or self._server.draining)
                return
        if quiet and self._server.refusing(self):
            close = one_plain_request(data)
            if close is not None:
                # Refused from the raw bytes: aiohttp's parser never builds this message
                # (headers, URL, body reader), so a refusal costs little more than its write.
                self._server.refuse_raw()
                self._answer_raw(FULL_ANSWERS, close)
                return
        if quiet and data.startswith(b"POST /v2/models/") and self._fast(data):
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

    # ---------------------------------------------------------------- the fast path
    def _fast(self, data: bytes) -> bool:
        """Take `data` on the fast path if it is one plain infer request: True if taken (run
        now, parked in the admission queue as its raw parse, or refused with a canned 503).
        Otherwise (a body over max_body_bytes, an encoding, an unusual header, a partial read)
        False: aiohttp's path takes it. Queued requests wait as a PlainInfer, not as aiohttp
        messages: a request shed at its deadline then cost one cheap parse and a write, where
        through aiohttp it cost a full parse (measured: open 2x goodput 0.02-0.16 C when the
        fast path gave way to aiohttp under pressure, see docs/architecture.md)."""
        srv = self._server
        if srv.raw is None:
            return False
        plain = plain_infer(data)
        if plain is None or len(plain[3]) > srv.current.plan.config.server.max_body_bytes:
            return False
        verdict = srv.arrive(self)
        if verdict is None:
            self._answer_raw(FULL_ANSWERS, plain[4] or srv.draining)
            return True
        self._raw_busy = True
        if verdict:
            self._run_fast(plain)
        else:
            self._parked = plain
        return True

    def _run_fast(self, plain: PlainInfer) -> None:
        self._slot_at = self._server.clock()
        self._raw_task = self._loop.create_task(self._serve_fast(plain))

    async def _serve_fast(self, plain: PlainInfer) -> None:
        name, version, headers, body, close = plain
        srv = self._server
        raw = srv.raw
        assert raw is not None
        try:
            status, payload, extra = await raw(name, version, headers, body)
        finally:
            self.request_done()
            self._raw_task = None
        close = close or srv.draining
        self._raw_done(raw_answer(status, payload, extra, close=close), close)

    def _raw_done(self, answer: bytes, close: bool) -> None:
        """Write a fast-path request's answer, then read what was pipelined behind it."""
        self._raw_busy = False
        self._answer_bytes(answer, close)
        pending, self._raw_pending = self._raw_pending, b""
        if pending and not close:
            self.data_received(pending)

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

    def spare(self, window: int) -> bool:
        """Did this connection sit idle through regime window `window`: no bytes sent in it and
        no request of its waiting or running (a client with room to send more)?"""
        return (
            self.seen < window
            and not self._raw_busy
            and self._held is None
            and not self._request_in_progress
            and not self._messages
        )

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
        """Admission let the held (or parked) request run (it holds a slot)."""
        parked = self._parked
        if parked is not None:
            self._parked = None
            self._run_fast(parked)
            return
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
        parked = self._parked
        if parked is not None:
            self._parked = None
            close = parked[4] or self._server.draining
            self._raw_done(
                (SHED_CLOSE if answer is SHED_KEEP else FULL_CLOSE) if close else answer, close
            )
            return
        held = self._held
        self._held = None
        self._held_body = False
        if not held:
            return
        msg, payload = held[0]
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
        if self._busy():
            return  # a request is being answered; its successor's headers may follow it
        self._server.refused(Refusal.HEADER_TIMEOUT)
        self._write(HEADER_TIMEOUT)
        self.force_close()

    def _process_keepalive(self) -> None:
        if self._held is not None or self._raw_busy:  # waiting for a slot or an answer
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
            error = f"malformed HTTP request: {malformed(exc)}"
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
        if self._busy():
            return  # its answer carries Connection: close
        self._loop.call_later(grace_s, self._close_if_idle)

    def _busy(self) -> bool:
        """A request of this connection is waiting, running or being answered."""
        return (
            self._request_in_progress
            or self._raw_busy
            or bool(self._messages)
            or self._held is not None
        )

    def _close_if_idle(self) -> None:
        if not self._busy():
            # close() alone only stops the loop waiting for a request: close the socket too
            self.force_close()
