"""The data plane's connections over real sockets: header, body and keep-alive timeouts, the
connection limit, decoded-body limits and encodings, admission (a request waits before its body
is decoded, and is shed with a canned 503 at its deadline; health is never held), and logs that
keep no client bytes."""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.config.load import load_config
from proxy.engine.counters import Refusal

from .helpers import BASE_CONFIG, infer_body, model_section, until

pytestmark = pytest.mark.timeout(60)


def limits_config(tmp_path: Path, models: str, **limits: Any) -> Any:
    """The tests' base config with `limits` set in its [limits] table."""
    values = {"max_inflight": 512, "queue_timeout_ms": 1000, **limits}
    table = "".join(
        f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in values.items()
    )
    base = BASE_CONFIG.format(max_body=200_000, max_inflight=512)
    head, _, rest = base.partition("[limits]\n")
    rest = rest[rest.index("[batching]") :]
    path = tmp_path / "config.toml"
    path.write_text(head + "[limits]\n" + table + "\n" + rest + models)
    return load_config(path)


async def exchange(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Write `data` on a new connection; everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def status_of(reply: bytes) -> int:
    return int(reply.split(b"\r\n", 1)[0].split()[1])


def post(path: str, body: bytes, *headers: str, close: bool = True) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: x",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *headers,
    ]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


GET_LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def test_stalled_headers_and_bodies_are_408_and_hold_no_slot(
    start: Any, tmp_path: Path, model_repo: Path, cancer_rows: Any
) -> None:
    config = limits_config(
        tmp_path,
        model_section(repo=model_repo),
        max_inflight=8,
        adaptive=False,
        header_timeout_s=0.5,
        body_timeout_s=0.5,
    )
    client, serving = await start(config)
    port = client.port
    good = orjson.dumps(infer_body(cancer_rows[:1]))
    # 32 clients (4x the slots) send headers and 10 bytes of a 1,000-byte body, then stall
    stalled = []
    for _ in range(32):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(post("/v2/models/cancer/infer", b"x" * 1000, close=False)[:-990])
        stalled.append((r, w))
    # meanwhile a probe and a good request are answered: a stalled body holds no slot
    assert status_of(await exchange(port, GET_LIVE)) == 200
    assert status_of(await exchange(port, post("/v2/models/cancer/infer", good))) == 200
    # a client that stops in the middle of its headers
    slow_head = await asyncio.open_connection("127.0.0.1", port)
    slow_head[1].write(b"POST /v2/models/cancer/infer HTTP/1.1\r\nHost: x\r\nContent-Le")
    for r, w in [*stalled, slow_head]:
        reply = await asyncio.wait_for(r.read(), 10)
        w.close()
        assert status_of(reply) == 408, reply
        assert b"Connection: close" in reply
        assert b"limits." in reply  # it names the setting
    refused = serving.counters.refused_counts()
    assert refused[Refusal.BODY_TIMEOUT] == 32 and refused[Refusal.HEADER_TIMEOUT] == 1
    assert status_of(await exchange(port, post("/v2/models/cancer/infer", good))) == 200


async def test_a_large_stalled_body_is_408_from_the_reader(
    start: Any, tmp_path: Path, model_repo: Path
) -> None:
    """A body too big to hold back (over 64 KiB) is admitted at its headers; when it stalls,
    the handler's read raises and the answer is a 408 from the handler."""
    config = limits_config(tmp_path, model_section(repo=model_repo), body_timeout_s=0.3)
    client, _ = await start(config)
    head = post("/v2/models/cancer/infer", b"x" * 150_000)[:-149_000]
    reply = await exchange(client.port, head)
    assert status_of(reply) == 408 and b"body_timeout_s" in reply


async def test_idle_keepalive_is_closed_and_connections_are_limited(
    start: Any, tmp_path: Path, model_repo: Path
) -> None:
    config = limits_config(
        tmp_path, model_section(repo=model_repo), keepalive_timeout_s=0.3, max_connections=4
    )
    client, serving = await start(config)
    port = client.port
    # an idle connection is closed by the server after keepalive_timeout_s
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(GET_LIVE.replace(b"Connection: close\r\n", b""))
    first = await asyncio.wait_for(r.readuntil(b'{"live":true}'), 5)
    assert status_of(first) == 200
    assert await asyncio.wait_for(r.read(), 5) == b""  # EOF: closed while idle
    w.close()
    # four connections are served; the fifth is told so and closed
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    for hr, hw in held:
        hw.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(await asyncio.wait_for(hr.readuntil(b"}"), 5)) == 200
    reply = await exchange(port, GET_LIVE)
    assert status_of(reply) == 503 and b"max_connections" in reply and b"Retry-After: 1" in reply
    for _, hw in held:
        hw.close()
    assert serving.counters.refused_counts()[Refusal.TOO_MANY_CONNECTIONS] == 1


@pytest.mark.parametrize("chunked", [False, True])
async def test_decoded_size_is_limited_and_encodings_are_checked(
    start: Any, tmp_path: Path, model_repo: Path, cancer_rows: Any, chunked: bool
) -> None:
    client, _ = await start(limits_config(tmp_path, model_section(repo=model_repo)))
    port = client.port
    good = orjson.dumps(infer_body(cancer_rows[:2]))
    # a real gzip body and a zlib-wrapped and a raw deflate body are decoded and served
    for enc, data in [
        ("gzip", gzip.compress(good)),
        ("deflate", zlib.compress(good)),
        ("deflate", zlib.compress(good)[2:-4]),
    ]:
        reply = await exchange(
            port, post("/v2/models/cancer/infer", data, f"Content-Encoding: {enc}")
        )
        assert status_of(reply) == 200, (enc, reply)
    # a bomb: 20 KB of gzip that decodes to 20 MB (100x max_body_bytes) stops at the limit
    bomb = gzip.compress(b" " * 20_000_000)
    assert len(bomb) < 200_000
    if chunked:
        body = (
            b"".join(
                b"%x\r\n%s\r\n" % (len(bomb[i : i + 4096]), bomb[i : i + 4096])
                for i in range(0, len(bomb), 4096)
            )
            + b"0\r\n\r\n"
        )
        head = (
            "POST /v2/models/cancer/infer HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        reply = await exchange(port, head.encode() + body)
    else:
        reply = await exchange(
            port, post("/v2/models/cancer/infer", bomb, "Content-Encoding: gzip")
        )
    assert status_of(reply) == 413 and b"200000 bytes" in reply, reply
    # an encoding the proxy does not decode is a 415 that lists those it does
    reply = await exchange(port, post("/v2/models/cancer/infer", good, "Content-Encoding: zstd"))
    assert status_of(reply) == 415 and b"supported: identity, gzip" in reply
    # a truncated gzip stream is a 400
    reply = await exchange(
        port, post("/v2/models/cancer/infer", gzip.compress(good)[:-8], "Content-Encoding: gzip")
    )
    assert status_of(reply) == 400 and b"truncated" in reply


async def behind_gate(
    start: Any, tmp_path: Path, model_repo: Path, url: str, rows: Any, slots: int, wait_ms: Any
) -> tuple[Any, Any, bytes]:
    """A proxy whose one version is the gated upstream at `url`, with `slots` fixed admission
    slots and queue_timeout_ms = `wait_ms`: (client, serving, a good request's bytes)."""
    versions = {"v3": f'{{ url = "{url}", timeout_ms = 30000 }}'}
    config = limits_config(
        tmp_path,
        model_section(repo=model_repo, versions=versions, stable="v3"),
        max_inflight=slots,
        adaptive=False,
        queue_timeout_ms=wait_ms,
    )
    client, serving = await start(config)
    good = post("/v2/models/cancer/infer", orjson.dumps(infer_body(rows[:1])))
    return client, serving, good


async def test_a_request_past_the_limit_waits_then_is_shed_canned_and_health_is_never_held(
    start: Any,
    tmp_path: Path,
    model_repo: Path,
    gated_upstream: Any,
    cancer_rows: Any,
) -> None:
    up, _, url = gated_upstream
    client, serving, good = await behind_gate(start, tmp_path, model_repo, url, cancer_rows, 4, 300)
    port = client.port
    up.gate.clear()
    running = [asyncio.create_task(exchange(port, good, timeout=30)) for _ in range(4)]
    await until(lambda: up.received == 4, "up.received == 4")
    # the fifth waits (parsed, not built) and is shed at its deadline with the canned 503
    server = client.server._data_server
    waiting = asyncio.create_task(exchange(port, good))
    await until(lambda: server.admission.waiting == 1, "server.admission.waiting == 1")
    # probes are answered at once while every slot is taken and a request waits
    assert status_of(await exchange(port, GET_LIVE)) == 200
    reply = await waiting
    assert status_of(reply) == 503 and b"Retry-After: 1" in reply and b"queue_timeout_ms" in reply
    assert up.received == 4  # the shed request never reached the model
    up.gate.set()
    assert [status_of(r) for r in await asyncio.gather(*running)] == [200] * 4
    assert serving.counters.shed_total == 1
    # a slot freed by an answer goes to the next waiter, in order, without a shed
    up.gate.clear()
    running = [asyncio.create_task(exchange(port, good, timeout=30)) for _ in range(4)]
    await until(lambda: up.received == 8, "up.received == 8")
    waiting = asyncio.create_task(exchange(port, good, timeout=30))
    await until(lambda: server.admission.waiting == 1, "server.admission.waiting == 1")
    up.gate.set()
    assert status_of(await waiting) == 200
    await asyncio.gather(*running)


async def test_malformed_http_is_a_json_400_and_the_log_keeps_no_client_bytes(
    start: Any,
    tmp_path: Path,
    model_repo: Path,
    cancer_rows: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, serving = await start(limits_config(tmp_path, model_section(repo=model_repo)))
    port = client.port
    secret = "s3cr3t-t0ken"
    bad = [
        f"GET /v2/health/live HTTP/1.1\r\nAuthorization: Bearer {secret}\x01\r\n\r\n".encode(),
        f"POST /v2/x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n{secret}".encode(),
        b"G\x00T / HTTP/1.1\r\n\r\n" + secret.encode(),
        b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n",
    ]
    with caplog.at_level(logging.DEBUG):
        for data in bad:
            reply = await exchange(port, data)
            assert status_of(reply) == 400, reply
            error = orjson.loads(reply.partition(b"\r\n\r\n")[2])["error"]
            assert error.startswith("malformed HTTP request: "), error
        # a client that disconnects in the middle of its body
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(post("/v2/models/cancer/infer", b"y" * 150_000)[:-140_000])
        await w.drain()
        w.close()
        await until(
            lambda: serving.counters.refused_counts()[Refusal.CLIENT_DISCONNECTED] == 1,
            "the disconnect counted",
        )
    text = "\n".join(
        f"{r.getMessage()} {r.exc_text or ''} {r.exc_info or ''}" for r in caplog.records
    )
    assert secret not in text and "yyyy" not in text and "aaaa" not in text
    assert "Traceback" not in text and not any(r.exc_info for r in caplog.records)
    # repeated refusals are one line with a count, not one line each
    malformed = [r for r in caplog.records if "do not parse as HTTP" in r.getMessage()]
    assert len(malformed) == 1
    assert serving.counters.refused_counts()[Refusal.MALFORMED_HTTP] == 4
    good = post("/v2/models/cancer/infer", orjson.dumps(infer_body(cancer_rows[:1])))
    assert status_of(await exchange(port, good)) == 200


def test_one_plain_request_is_recognised_only_when_whole_and_simple() -> None:
    """The raw-bytes refusal answers only what aiohttp's parser would read as one plain
    request; anything else is left to the parser."""
    from proxy.http.refusals import one_plain_request

    body = b'{"inputs": []}'
    keep = post("/v2/models/cancer/infer", body, close=False)
    assert one_plain_request(keep) is False
    assert one_plain_request(post("/v2/models/cancer/infer", body)) is True
    assert one_plain_request(keep[:-1]) is None  # body not all here
    assert one_plain_request(keep + keep) is None  # two requests (pipelined)
    assert one_plain_request(GET_LIVE) is None  # probes are never refused
    assert (
        one_plain_request(keep.replace(b"Content-Length", b"Transfer-Encoding: chunked\r\nX"))
        is None
    )
    twice = keep.replace(b"Host: x", b"Content-Length: 14\r\nHost: x")
    assert one_plain_request(twice) is None
    assert one_plain_request(keep.replace(b"HTTP/1.1", b"HTTP/1.0")) is True
    assert one_plain_request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") is False


async def test_a_full_queue_refuses_from_the_raw_bytes(
    start: Any, tmp_path: Path, model_repo: Path, gated_upstream: Any, cancer_rows: Any
) -> None:
    """With every slot taken and the queue full (8 per slot), the next request is answered 503
    from its bytes, before aiohttp builds it; the waiters are then served."""
    up, _, url = gated_upstream
    client, serving, good = await behind_gate(
        start, tmp_path, model_repo, url, cancer_rows, 1, 20_000
    )
    port = client.port
    server = client.server._data_server
    up.gate.clear()
    held = [asyncio.create_task(exchange(port, good, timeout=30))]
    await until(lambda: up.received == 1, "up.received == 1")
    held += [asyncio.create_task(exchange(port, good, timeout=30)) for _ in range(8)]
    await until(lambda: server.admission.waiting == 8, "server.admission.waiting == 8")
    reply = await exchange(port, good)
    assert (
        status_of(reply) == 503 and b"Retry-After: 1" in reply and b"could not be admitted" in reply
    )
    assert serving.counters.shed_total == 1
    up.gate.set()
    assert [status_of(r) for r in await asyncio.gather(*held)] == [200] * 9


async def test_the_heartbeat_accepts_connections_from_the_listening_socket(
    start: Any, tmp_path: Path, model_repo: Path
) -> None:
    """Past capacity the loop's own accept falls behind (DataServer.listen_on), so the
    heartbeat takes new connections too. Here they come to a second listening socket the loop
    does not watch at all: only the heartbeat can accept them. They are served like any other,
    and once stop_accepting and the owner's close have run, the socket no longer listens."""
    client, _ = await start(limits_config(tmp_path, model_section(repo=model_repo)))
    data_server = client.server._data_server
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    data_server.listen_on(listener.fileno())
    # one keep-alive connection accepted by the loop keeps the heartbeat beating
    r, w = await asyncio.open_connection("127.0.0.1", client.port)
    w.write(GET_LIVE.replace(b"Connection: close\r\n", b""))
    assert status_of(await asyncio.wait_for(r.readuntil(b'{"live":true}'), 5)) == 200
    replies = await asyncio.gather(*(exchange(port, GET_LIVE) for _ in range(20)))
    assert [status_of(reply) for reply in replies] == [200] * 20
    data_server.stop_accepting()
    listener.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    w.close()


async def test_clients_are_held_while_every_connection_waits_and_released_when_more_open(
    start: Any,
    tmp_path: Path,
    model_repo: Path,
    gated_upstream: Any,
    cancer_rows: Any,
) -> None:
    """Closed loop: every client connection has a request waiting and none are opening, so the
    server holds them (FIFO, 10 deadlines) rather than refusing work that would come straight
    back. Connections that keep opening mean load that does not wait for us: the hold ends at
    once and is not tried again before its backoff."""
    up, _, url = gated_upstream
    client, _, good = await behind_gate(start, tmp_path, model_repo, url, cancer_rows, 4, 5000)
    port = client.port
    server = client.server._data_server
    up.gate.clear()
    busy = [asyncio.create_task(exchange(port, good, timeout=60)) for _ in range(12)]
    await until(lambda: server.admission.waiting == 8, "server.admission.waiting == 8")
    assert not server.admission.held  # twelve connections just opened
    await until(lambda: server.admission.held, "server.admission.held")  # then all quiet
    opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
    await until(lambda: not server.admission.held, "not server.admission.held")
    assert server.hold.not_before > server.clock()  # backoff: not held again at once
    up.gate.set()
    assert [status_of(reply) for reply in await asyncio.gather(*busy)] == [200] * 12
    for _, w in opened:
        w.close()


async def read_one(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response off a keep-alive connection: (head, body), framed by Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return head, await asyncio.wait_for(reader.readexactly(length), 10)


async def test_probes_are_answered_from_the_raw_bytes_as_the_handler_answers_them(
    start: Any, tmp_path: Path, model_repo: Path, cancer_rows: Any
) -> None:
    client, _ = await start(limits_config(tmp_path, model_section(repo=model_repo)))
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        answers = []
        for target in ("/v2/health/live", "/v2/health/ready", "/v2/health/live?via=aiohttp"):
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe\r\n\r\n".encode()
            )
            head, body = await read_one(reader)
            assert head.startswith(b"HTTP/1.1 200 ") and b"application/json" in head.lower()
            answers.append(orjson.loads(body))
            # aiohttp's answers name it; the raw ones (no handler, no request object) do not
            assert (b"server:" in head.lower()) == ("?" in target), head
        # the fast path's answers are the handler's (the query string takes aiohttp's path)
        assert answers == [{"live": True}, {"ready": True}, {"live": True}]
        # the connection stays usable for real work, then a probe asking to close closes it
        writer.write(
            post("/v2/models/cancer/infer", orjson.dumps(infer_body(cancer_rows[:1])), close=False)
        )
        head, _ = await read_one(reader)
        assert head.startswith(b"HTTP/1.1 200 ")
        writer.write(b"GET /v2/health/ready HTTP/1.1\r\nConnection: close\r\n\r\n")
        head, body = await read_one(reader)
        assert b"connection: close" in head.lower() and orjson.loads(body) == {"ready": True}
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
    finally:
        writer.close()
    # not a GET, or a header aiohttp would refuse: not the fast path's to answer
    assert (
        status_of(
            await exchange(
                client.port,
                b"POST /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
        )
        == 405
    )
    assert (
        status_of(
            await exchange(
                client.port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n"
            )
        )
        == 400
    )


async def test_a_plain_infer_waits_as_raw_bytes_and_is_served_shed_or_dropped_from_the_queue(
    start: Any,
    tmp_path: Path,
    model_repo: Path,
    gated_upstream: Any,
    cancer_rows: Any,
) -> None:
    """A plain infer that finds no slot waits parked as its raw parse (no aiohttp message):
    admitted, the fast path answers it (no Server header, which aiohttp's answers carry); shed,
    its keep-alive connection goes on with the next request; a parked client that goes away
    is dropped from the queue and takes no slot."""
    up, _, url = gated_upstream
    client, serving, _ = await behind_gate(start, tmp_path, model_repo, url, cancer_rows, 2, 300)
    port, server = client.port, client.server._data_server
    keep = post("/v2/models/cancer/infer", orjson.dumps(infer_body(cancer_rows[:1])), close=False)
    up.gate.clear()
    busy = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    for _, w in busy:
        w.write(keep)
    await until(lambda: up.received == 2, "up.received == 2")
    # parked, then shed at its deadline: a canned 503, and the connection serves the next one
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(keep)
    await until(lambda: server.admission.waiting == 1, "one parked")
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    await r.readexactly(length)
    # a parked client that disconnects is skipped: its turn gives no slot away
    _, gone_w = await asyncio.open_connection("127.0.0.1", port)
    gone_w.write(keep)
    await until(lambda: server.admission.waiting == 1, "the second parked")
    gone_w.close()
    await until(lambda: server.admission.waiting == 0, "the gone one dropped")
    # parked, then admitted when a slot frees: answered by the fast path
    w.write(keep)
    await until(lambda: server.admission.waiting == 1, "the third parked")
    up.gate.set()
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200") and b"\r\nServer:" not in head
    for br, _ in busy:
        assert (await asyncio.wait_for(br.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
    assert server.admission.inflight == 0 and server.admission.waiting == 0
    assert serving.counters.shed_total == 1 and up.received == 3  # the gone one never ran
    for _, bw in [*busy, (r, w)]:
        bw.close()
