"""The fast path's bytes: a plain infer request read whole from one read, parsed without
aiohttp's parser, and its answer written as bytes. The connection (`DataProtocol._fast` in
http/connection.py) serves it through `DataPlane.handle_raw`, with the same answer, errors,
routing and records as through aiohttp, but without aiohttp's request object, handler task or
response (measured as most of a request's cost); anything unusual, and any request that cannot
run at once, goes through aiohttp as before."""

from __future__ import annotations

import re
from http import HTTPStatus

from proxy.http.refusals import ordinary_lines, plain_request

_INFER = re.compile(rb"/v2/models/([A-Za-z0-9_.-]+)/(?:versions/([A-Za-z0-9_.-]+)/)?infer")
PlainInfer = tuple[str, str | None, dict[str, str], bytes, bool]
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}" for s in HTTPStatus}


def plain_infer(data: bytes) -> PlainInfer | None:
    """If `data` is exactly one whole plain HTTP/1.1 `POST /v2/models/<m>[/versions/<v>]/infer`
    (see `one_plain_request`) with ordinary header lines, no Content-Encoding but identity and
    no Expect: (model, version or None, headers by lower-case name (the first of repeats),
    body, whether it asks to close). Else None: aiohttp's parser takes it."""
    plain = plain_request(data)
    if plain is None:
        return None
    (method, target, version), lines, close = plain
    if method != b"POST" or version != b"HTTP/1.1":
        return None
    m = _INFER.fullmatch(target)
    if m is None:
        return None
    ordinary = ordinary_lines(lines)
    if ordinary is None:
        return None
    headers: dict[str, str] = {}
    for line in ordinary:
        key, _, value = line.partition(b":")
        headers.setdefault(key.decode().lower(), value.strip(b" \t").decode())
    if headers.get("content-encoding", "identity").lower() != "identity" or "expect" in headers:
        return None
    body = data[data.find(b"\r\n\r\n") + 4 :]
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
