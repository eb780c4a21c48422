"""The fast path's bytes: a plain infer request read whole from one read, parsed without
aiohttp's parser, and its answer written as bytes. The connection (`DataProtocol._fast` in
http/connection.py) serves it through `DataPlane.handle_raw`, with the same answer, errors,
routing and records as through aiohttp, but without aiohttp's request object, handler task or
response (measured as most of a request's cost); anything unusual goes through aiohttp."""

from __future__ import annotations

import re
from http import HTTPStatus

from aiohttp.http_parser import SINGLETON_HEADERS

# One match over the request line and the header block: each header line a token, a colon and
# visible ASCII (no folding, no obs-text: aiohttp's parser judges those).
_HEAD = re.compile(
    rb"POST /v2/models/([A-Za-z0-9_.-]+)/(?:versions/([A-Za-z0-9_.-]+)/)?infer HTTP/1\.1\r\n"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\x21-\x7e \t]*\r\n)*)\r\n"
)
_LENGTH = re.compile(r"[0-9]{1,12}")
# Repeated, these are a 400 from aiohttp's parser (its own list), or not plain
_ONCE = SINGLETON_HEADERS | {"connection", "content-encoding", "expect", "upgrade"}
PlainInfer = tuple[str, str | None, dict[str, str], bytes, bool]
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}" for s in HTTPStatus}


def plain_infer(data: bytes) -> PlainInfer | None:
    """If `data` is exactly one whole plain HTTP/1.1 `POST /v2/models/<m>[/versions/<v>]/infer`
    (ordinary header lines, a Host, one Content-Length that the body fills exactly, no
    Transfer-Encoding, Upgrade or Expect, no Content-Encoding but identity): (model, version or
    None, headers by lower-case name (the first of repeats), body, whether it asks to close).
    Else None: aiohttp's parser takes it. One regex match and one pass over the header lines
    (tests/test_properties.py checks it against aiohttp's parser)."""
    m = _HEAD.match(data)
    if m is None:
        return None
    headers: dict[str, str] = {}
    for line in m.group(3).decode().split("\r\n"):  # (ASCII, and each line a token and a colon)
        if not line:
            continue
        key, _, value = line.partition(":")
        name = key.lower()
        if name in headers:
            if name in _ONCE:
                return None
            continue
        headers[name] = value.strip(" \t")
    if "transfer-encoding" in headers or "upgrade" in headers or "expect" in headers:
        return None
    if "host" not in headers:
        return None  # HTTP/1.1 requires it: aiohttp's parser answers 400
    length = headers.get("content-length", "0")
    body = data[m.end() :]
    if not _LENGTH.fullmatch(length) or int(length) != len(body):
        return None
    if headers.get("content-encoding", "identity").lower() != "identity":
        return None
    connection = headers.get("connection", "keep-alive").lower()
    if connection not in ("close", "keep-alive"):
        return None  # a token list (aiohttp's parser decides what it means)
    close = connection == "close"
    pinned = m.group(2)
    return m.group(1).decode(), None if pinned is None else pinned.decode(), headers, body, close


def raw_answer(status: int, body: bytes, headers: list[tuple[str, str]], *, close: bool) -> bytes:
    """An HTTP/1.1 response as bytes: `headers` (Content-Type among them), Content-Length and,
    when `close`, Connection: close."""
    head = [_STATUS_LINES[status]]
    head += [f"{k}: {v}" for k, v in headers]
    head.append(f"Content-Length: {len(body)}")
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body
