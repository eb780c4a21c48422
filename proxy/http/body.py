"""Reading a request body: its Content-Encoding decoded as it arrives, bounded by
`server.max_body_bytes` on the decoded size (a 1 MB gzip bomb stops at the limit, not at 1 GB),
framing and encoding errors a 400, an encoding we do not decode a 415, a stalled body a 408."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import PayloadEncodingError

from proxy.errors import (
    InvalidInputError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnsupportedEncodingError,
)
from proxy.http.refusals import BodyTimeoutError

try:  # brotli is optional (aiohttp's speedups extra); without it "br" is a 415
    import brotli  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the environment
    brotli = None

IDENTITY = ("", "identity")
SUPPORTED: tuple[str, ...] = ("identity", "gzip", "x-gzip", "deflate") + (
    ("br",) if brotli is not None else ()
)


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole decoded body, or the client's error: 413 as soon as the decoded size passes
    `limit`, 400 for broken framing or compressed data, 415 for an unknown encoding, 408 when
    the transport timed the body out. After a 413 aiohttp reads and discards the rest of the
    wire body for a while (its lingering close), so a client that writes its whole body before
    reading still gets the answer."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    try:
        if encoding in IDENTITY:
            return await _read_plain(request, limit)
        return await _read_decoded(request, limit, encoding)
    except BodyTimeoutError as exc:
        _abandon(request)
        raise RequestTimeoutError(exc.limit_s) from None
    except (PayloadEncodingError, web.RequestPayloadError):
        _abandon(request)
        raise InvalidInputError(
            "the request body is malformed (its length or chunked framing does not hold)"
        ) from None


def _abandon(request: web.BaseRequest) -> None:
    """The body will not be read to its end: close the connection after the answer, and mark
    the body read, so aiohttp neither drains it nor logs the error again."""
    request.protocol.close()
    request.content.feed_eof()


async def _read_plain(request: web.BaseRequest, limit: int) -> bytes:
    length = request.content_length
    if length is not None:
        if length > limit:
            raise PayloadTooLargeError(limit)
        return await request.content.read() if length else b""
    chunks = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_decoded(request: web.BaseRequest, limit: int, encoding: str) -> bytes:
    if encoding not in SUPPORTED:
        _abandon(request)
        raise UnsupportedEncodingError(encoding, SUPPORTED)
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLargeError(limit)
    decoder = _Decoder(encoding, limit)
    wire = 0
    try:
        while chunk := await request.content.readany():
            wire += len(chunk)
            if wire > limit:
                raise PayloadTooLargeError(limit)
            decoder.feed(chunk)
        return decoder.finish()
    except (zlib.error, _BrotliError) as exc:
        _abandon(request)
        raise InvalidInputError(
            f"the request body is not valid {encoding} data (Content-Encoding: {encoding}):"
            f" {str(exc)[:80]}"
        ) from None


class _BrotliError(Exception):
    pass


class _Decoder:
    """Incremental decoding that never holds more than `limit` + 1 decoded bytes."""

    def __init__(self, encoding: str, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.out: list[bytes] = []
        self.encoding = encoding
        self._first = True
        self._br: Any = None
        self._z: Any = None
        if encoding == "br":
            self._br = brotli.Decompressor()
        else:
            wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
            self._z = zlib.decompressobj(wbits)

    def _keep(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise PayloadTooLargeError(self.limit)
        self.out.append(data)

    def feed(self, chunk: bytes) -> None:
        if self._br is not None:
            self._feed_br(chunk)
            return
        z = self._z
        if z.eof:
            raise zlib.error("data after the end of the compressed stream")
        try:
            data = z.decompress(chunk, self.limit - self.size + 1)
        except zlib.error:
            if not (self._first and self.encoding == "deflate"):
                raise
            # "deflate" is often sent raw (no zlib header): try that once, from the start.
            z = self._z = zlib.decompressobj(-zlib.MAX_WBITS)
            data = z.decompress(chunk, self.limit - self.size + 1)
        self._first = False
        self._keep(data)
        self._drain(z.decompress)

    def _drain(self, decompress: Callable[[bytes, int], bytes]) -> None:
        z = self._z
        while z.unconsumed_tail:
            self._keep(decompress(z.unconsumed_tail, self.limit - self.size + 1))

    def _feed_br(self, chunk: bytes) -> None:
        d = self._br
        try:
            self._keep(d.process(chunk, output_buffer_limit=self.limit - self.size + 1))
            while not d.can_accept_more_data():
                self._keep(d.process(b"", output_buffer_limit=self.limit - self.size + 1))
        except brotli.error as exc:
            raise _BrotliError(str(exc)) from None

    def finish(self) -> bytes:
        if self._br is not None:
            if not self._br.is_finished():
                raise _BrotliError("the compressed stream is truncated")
        else:
            if not self._z.eof:
                raise zlib.error("the compressed stream is truncated")
            self._keep(self._z.flush())
        return b"".join(self.out)
