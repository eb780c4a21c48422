"""The fast path over real sockets: a plain infer request read whole is answered from its raw
bytes (no aiohttp request or response), with the same answer, errors, routing and counts as
through aiohttp; pipelined bytes wait for its answer; anything unusual goes through aiohttp.

aiohttp's answers carry a `Server` header and the fast path's do not: that is how these tests
tell which path answered."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from .helpers import infer_body, model_section

pytestmark = pytest.mark.timeout(60)
PATH = b"/v2/models/cancer/infer"


def body_of(rows: Any, rid: str | None = None) -> bytes:
    return orjson.dumps(infer_body(rows, rid=rid))


def request(body: bytes, *, path: bytes = PATH, extra: bytes = b"") -> bytes:
    head = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    return head + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return status, headers, body


async def connect(client: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", client.server.port)


async def test_a_plain_infer_is_answered_from_raw_bytes_like_through_aiohttp(
    start: Any, write_config: Any, model_repo: Any, cancer_rows: Any
) -> None:
    client, serving = await start(write_config(model_section(repo=model_repo)))
    body = body_of(cancer_rows[:3], "r1")
    reader, writer = await connect(client)
    writer.write(request(body))  # one plain request: the fast path
    fast = await read_answer(reader)
    # the same with a header value that is not ASCII (UTF-8 é): aiohttp parses it
    writer.write(request(body, extra="x-note: caf\u00e9\r\n".encode()))
    slow = await read_answer(reader)
    writer.close()
    assert fast[0] == slow[0] == 200
    assert "server" not in fast[1] and "server" in slow[1]
    assert fast[1]["x-model-version"] == slow[1]["x-model-version"] == "v1"
    assert fast[1]["content-type"] == "application/json"
    assert orjson.loads(fast[2]) == orjson.loads(slow[2])
    assert orjson.loads(fast[2])["id"] == "r1"
    stats = serving.current.plan.models["cancer"].stats["v1"]
    assert stats.requests == 2 and stats.rows == 6


async def test_errors_on_the_fast_path_are_the_same_4xx_and_keep_the_connection(
    start: Any, write_config: Any, model_repo: Any, cancer_rows: Any
) -> None:
    client, _ = await start(write_config(model_section(repo=model_repo)))
    reader, writer = await connect(client)
    cases = [
        (request(b'{"inputs": 5}'), 400, "inputs"),
        (request(b"\xff\xfe not json"), 400, "JSON"),
        (request(body_of(cancer_rows[:1]), path=b"/v2/models/nope/infer"), 404, "nope"),
        (request(body_of(cancer_rows[:1]), path=b"/v2/models/cancer/versions/v9/infer"), 404, "v9"),
    ]
    for raw, status, word in cases:
        writer.write(raw)
        got = await read_answer(reader)
        assert got[0] == status and "server" not in got[1], got
        assert word in orjson.loads(got[2])["error"]
    writer.write(request(body_of(cancer_rows[:1]), path=b"/v2/models/cancer/versions/v2/infer"))
    got = await read_answer(reader)
    assert got[0] == 200 and got[1]["x-model-version"] == "v2"
    writer.close()


async def test_pipelined_requests_are_answered_in_order(
    start: Any, write_config: Any, model_repo: Any, cancer_rows: Any
) -> None:
    client, _ = await start(write_config(model_section(repo=model_repo)))
    reader, writer = await connect(client)
    first = request(body_of(cancer_rows[:1], "a"))
    writer.write(first)
    await writer.drain()
    # sent before the first is answered: they wait for it (bytes kept, then read)
    writer.write(request(body_of(cancer_rows[:1], "b")))
    writer.write(request(body_of(cancer_rows[:1], "c")))
    ids = [orjson.loads((await read_answer(reader))[2])["id"] for _ in range(3)]
    assert ids == ["a", "b", "c"]
    # two requests in one write are not "one plain request": aiohttp answers both, in order
    writer.write(request(body_of(cancer_rows[:1], "d")) + request(body_of(cancer_rows[:1], "e")))
    answers = [await read_answer(reader) for _ in range(2)]
    assert [orjson.loads(a[2])["id"] for a in answers] == ["d", "e"]
    assert all("server" in a[1] for a in answers)
    writer.close()


async def test_connection_close_and_unusual_requests(
    start: Any, write_config: Any, model_repo: Any, cancer_rows: Any
) -> None:
    client, _ = await start(write_config(model_section(repo=model_repo)))
    body = body_of(cancer_rows[:1])
    reader, writer = await connect(client)
    writer.write(request(body, extra=b"Connection: close\r\n"))
    got = await read_answer(reader)
    assert got[0] == 200 and got[1]["connection"] == "close" and "server" not in got[1]
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed after the answer
    writer.close()
    # a header with a byte that is not visible ASCII, an encoding, an Expect: aiohttp's path
    for extra in (b"x-user-id: \xff\r\n", b"Content-Encoding: identity\r\n"):
        reader, writer = await connect(client)
        writer.write(request(body, extra=extra))
        got = await read_answer(reader)
        assert got[0] == 200
        assert ("server" in got[1]) == (b"\xff" in extra)
        writer.close()
