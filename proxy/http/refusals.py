"""What the data plane's connections answer when they do not serve a request: canned
responses written straight to the socket (503, 408), the check that a read holds one plain
request (so a refusal needs no parse), and aiohttp's bad-request logging without the bytes."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from time import perf_counter

import orjson
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from proxy.engine.counters import Refusal
from proxy.engine.throttle import LogThrottle

LOG_INTERVAL_S = 10.0  # repeated refusals are logged at most this often, with their count


def _canned(status: int, reason: str, error: str, *, close: bool, retry: bool = False) -> bytes:
    return _response(status, reason, orjson.dumps({"error": error}), close=close, retry=retry)


def _response(status: int, reason: str, body: bytes, *, close: bool, retry: bool = False) -> bytes:
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
FULL_ANSWERS = (FULL, FULL_CLOSE)  # (keep-alive, close)
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


REFUSALS = {
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
        record.args = (n, malformed(exc))
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        return True


def malformed(exc: BaseException | None) -> str:
    """What was wrong with an unparseable request, without repeating its bytes."""
    if isinstance(exc, LineTooLong):
        return "a request line or header is too long"
    name = type(exc).__name__ if exc is not None else "BadHttpMessage"
    return f"it does not parse as HTTP/1.1 ({name})"


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,12})[ \t]*(?:\r\n|$)")


# A header line a probe's fast path takes as it is: a token, a colon, visible ASCII.
_HEADER_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\x21-\x7e \t]*")


# The server health documents (live and ready are constant while the process serves): the
# data plane's handler answers them, and so does the raw fast path, from HEALTH: (keep-alive,
# close) answers by the raw request target.
HEALTH_DOCS = {"live": {"live": True}, "ready": {"ready": True}}


def _ok(doc: dict[str, bool]) -> tuple[bytes, bytes]:
    body = orjson.dumps(doc)
    return _response(200, "OK", body, close=False), _response(200, "OK", body, close=True)


HEALTH = {f"/v2/health/{k}".encode(): _ok(doc) for k, doc in HEALTH_DOCS.items()}


def health_probe(data: bytes) -> tuple[bytes, bool] | None:
    """If `data` is exactly one whole plain `GET /v2/health/live|ready` (see
    `one_plain_request`) whose header lines are all ordinary: (its target, whether it asks to
    close); else None (aiohttp's parser judges it: a 400 if malformed)."""
    plain = plain_request(data)
    if plain is None:
        return None
    (method, target, _), headers, close = plain
    if method != b"GET" or target not in HEALTH:
        return None
    if ordinary_lines(headers) is None:
        return None
    return target, close


def ordinary_lines(headers: bytes) -> list[bytes] | None:
    """The header lines of `headers` if each is a token, a colon and visible ASCII (what the
    raw paths take as they are), else None."""
    if not headers:
        return []
    lines = headers.split(b"\r\n")
    return lines if all(_HEADER_LINE.fullmatch(line) for line in lines) else None


def one_plain_request(data: bytes) -> bool | None:
    """If `data` is exactly one whole, plain HTTP/1.x request (no chunking, upgrade, folded or
    repeated Content-Length, not a health probe): whether it asks to close; else None (let
    aiohttp parse it)."""
    plain = plain_request(data)
    if plain is None or plain[0][1].startswith(b"/v2/health/"):
        return None  # (a probe is never refused)
    return plain[2]


def plain_request(data: bytes) -> tuple[list[bytes], bytes, bool] | None:
    """(The request line's three parts, the header lines after it, whether it asks to close)
    if `data` is exactly one whole plain HTTP/1.x request (see `one_plain_request`), else
    None."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[:end]
    line_end = head.find(b"\r\n")
    parts = (head if line_end < 0 else head[:line_end]).split(b" ")
    if len(parts) != 3:
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
    headers = b"" if line_end < 0 else head[line_end + 2 :]
    if version == b"HTTP/1.0":
        return parts, headers, b"\r\nconnection: keep-alive" not in lower
    return parts, headers, b"\r\nconnection: close" in lower
