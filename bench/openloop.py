"""An open-loop (fixed-rate) HTTP/1.1 load generator, for latency at a fixed offered load.

wrk is closed-loop: each connection waits for its answer before sending again, so a slow server
is offered less load and its queueing never shows ("coordinated omission"). Debian has no wrk2,
so this sends requests on a fixed schedule instead: request i is due at t0 + i / rate, whether
or not earlier ones have been answered, and its latency is measured from that scheduled time
to the last byte of its answer. Time a request spends waiting for a free connection, or behind
a late generator, therefore counts against the server as it would for a real client.

It is a minimal keep-alive HTTP/1.1 client on raw asyncio protocols over uvloop (no aiohttp
client: its per-request overhead would both cap the rate and add to every latency). Requests
go on up to --max-conns connections, one request in flight per connection, no pipelining;
--preopen of them are connected before the clock starts. The generator busy-polls the event
loop between sends (sleeping only when the next send is more than 2 ms away), so pin it to a
core of its own; the cyclic garbage collector is off while it sends. It reports its own dispatch lag (when it sent versus when it should have):
if that grows, the generator, not the server, is the bottleneck, and "sustained" is false.

Responses must carry Content-Length (aiohttp's do). The answer is one JSON object on stdout.

Run: ``taskset -c 1 .venv/bin/python bench/openloop.py --port 8080 --rate 3000 --duration 10
--bodies bodies.txt``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import re
import statistics
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, cast

import orjson
import uvloop

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
SLEEP_THRESHOLD_S = 0.002
MAX_LAG_P50_MS = 0.2
MAX_LAG_P99_MS = 2.0
TRACE_COLUMNS = ("due_s", "wait_s", "latency_s", "status", "fresh")


@dataclass(slots=True)
class _Request:
    index: int
    scheduled: float
    payload: bytes
    sent: float = 0.0  # when a connection took it (waiting for one counts against the server)
    fresh: bool = False  # it went out on a connection opened for it


@dataclass
class _Book:
    """What happened to every request, filled in by the connections."""

    measure_from: float
    latencies: list[float] = field(default_factory=list)  # seconds, measured window only
    by_status: dict[int, list[float]] = field(default_factory=dict)  # the same, per status
    trace: list[tuple[float, float, float, int, bool]] | None = None  # see --trace
    statuses: Counter[int] = field(default_factory=Counter)
    all_statuses: Counter[int] = field(default_factory=Counter)  # warm-up included
    completed: int = 0
    errors: int = 0
    outstanding: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    def done(self, req: _Request, status: int | None, now: float) -> None:
        self.outstanding -= 1
        if status is None:
            self.errors += 1
        else:
            self.completed += 1
            self.all_statuses[status] += 1
            if req.scheduled >= self.measure_from:
                self.statuses[status] += 1
                latency = now - req.scheduled
                self.latencies.append(latency)
                self.by_status.setdefault(status, []).append(latency)
                if self.trace is not None:
                    self.trace.append(
                        (req.scheduled, req.sent - req.scheduled, latency, status, req.fresh)
                    )
        if self.outstanding == 0:
            self.drained.set()


class _Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.current: _Request | None = None
        self.used = False  # it has carried a request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, req: _Request) -> None:
        assert self.transport is not None
        self.current = req
        req.sent = perf_counter()
        req.fresh = not self.used
        self.used = True
        self.transport.write(req.payload)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.current is None:
            return
        head = bytes(self.buf[:end])
        m = _CONTENT_LENGTH.search(head)
        if m is None:
            self.pool.protocol_errors += 1
            if self.transport is not None:
                self.transport.close()  # cannot frame the answer; connection_lost counts it
            return
        total = end + 4 + int(m.group(1))
        if len(self.buf) < total:
            return
        now = perf_counter()
        status = int(head[9:12])
        del self.buf[:total]
        req, self.current = self.current, None
        self.pool.book.done(req, status, now)
        self.pool.idle(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.current is not None:
            self.pool.book.done(self.current, None, perf_counter())
            self.current = None
        self.pool.lost(self)


class _Pool:
    """Idle connections, a backlog of due requests no connection could take yet."""

    def __init__(self, host: str, port: int, max_conns: int, book: _Book) -> None:
        self.host = host
        self.port = port
        self.max_conns = max_conns
        self.book = book
        self.free: list[_Conn] = []
        self.backlog: deque[_Request] = deque()
        self.n_conns = 0
        self.max_seen = 0
        self.connect_errors = 0
        self.protocol_errors = 0
        self._opening: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        self.n_conns += 1
        self.max_seen = max(self.max_seen, self.n_conns)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except OSError:
            self.n_conns -= 1
            self.connect_errors += 1
            if self.backlog:
                self.book.done(self.backlog.popleft(), None, perf_counter())
            return
        self.idle(conn)

    def submit(self, req: _Request) -> None:
        self.book.outstanding += 1
        self.book.drained.clear()
        if self.free:
            self.free.pop().send(req)
            return
        self.backlog.append(req)
        if self.n_conns < self.max_conns:
            task = asyncio.get_running_loop().create_task(self.open())
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    def idle(self, conn: _Conn) -> None:
        if self.backlog:
            conn.send(self.backlog.popleft())
        else:
            self.free.append(conn)

    def lost(self, conn: _Conn) -> None:
        self.n_conns -= 1
        if conn in self.free:
            self.free.remove(conn)

    def close(self) -> None:
        for conn in self.free:
            if conn.transport is not None:
                conn.transport.close()
        self.free.clear()


def _quantile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0, 4)


def _request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def run_open_loop(
    *,
    host: str,
    port: int,
    path: str,
    bodies: list[bytes],
    rate: float,
    duration: float,
    warmup: float,
    max_conns: int = 256,
    preopen: int = 32,
    drain_timeout: float = 5.0,
    trace: Path | None = None,
) -> dict[str, Any]:
    """Offer `rate` requests/s for warmup + duration seconds; latencies of the last `duration`."""
    payloads = [_request_bytes(host, port, path, b) for b in bodies]
    book = _Book(measure_from=float("inf"))
    pool = _Pool(host, port, max_conns, book)
    for _ in range(min(preopen, max_conns)):
        await pool.open()
    if pool.connect_errors:
        raise OSError(f"cannot connect to {host}:{port}")
    for conn in pool.free:
        conn.used = True  # opened before the clock: no request waited for it
    if trace is not None:
        book.trace = []
    # The cyclic GC pauses this process for milliseconds now and then, which would show up as
    # dispatch lag and latency; nothing here needs it for a run of seconds.
    gc.collect()
    gc.freeze()
    gc.disable()
    interval = 1.0 / rate
    n_total = int(rate * (warmup + duration))
    t0 = perf_counter() + 0.005
    book.measure_from = t0 + warmup
    lags: list[float] = []
    i = 0
    while i < n_total:  # bounded: every pass either sends or waits for the next due time
        now = perf_counter()
        while i < n_total and t0 + i * interval <= now:
            scheduled = t0 + i * interval
            if scheduled >= book.measure_from:
                lags.append(now - scheduled)
            pool.submit(_Request(i, scheduled, payloads[i % len(payloads)]))
            i += 1
        gap = t0 + i * interval - perf_counter()
        await asyncio.sleep(gap - SLEEP_THRESHOLD_S / 2 if gap > SLEEP_THRESHOLD_S else 0)
    sent_end = perf_counter()
    schedule_end = t0 + n_total * interval
    try:
        await asyncio.wait_for(book.drained.wait(), timeout=drain_timeout)
    except TimeoutError:
        pass
    unfinished = book.outstanding
    pool.close()
    lag_p50 = _quantile_ms(lags, 0.5)
    lag_p99 = _quantile_ms(lags, 0.99)
    sustained = (
        lag_p50 is not None
        and lag_p99 is not None
        and lag_p50 <= MAX_LAG_P50_MS
        and lag_p99 <= MAX_LAG_P99_MS
    )
    n_measured = len(book.latencies)
    if trace is not None and book.trace is not None:
        t_from = book.measure_from
        rows = [(s - t_from, wait, lat, st, fresh) for s, wait, lat, st, fresh in book.trace]
        epoch = time.time() - (perf_counter() - t_from)  # due_s 0 on the wall clock
        trace.write_bytes(orjson.dumps({"columns": TRACE_COLUMNS, "epoch": epoch, "rows": rows}))
    non_2xx = sum(n for s, n in book.statuses.items() if not 200 <= s < 300)
    return {
        "target_rps": rate,
        "duration_s": duration,
        "warmup_s": warmup,
        "scheduled": n_total,
        "completed": book.completed,
        "measured": n_measured,
        "achieved_rps": round(n_measured / duration, 1),
        "p50_ms": _quantile_ms(book.latencies, 0.5),
        "p90_ms": _quantile_ms(book.latencies, 0.9),
        "p99_ms": _quantile_ms(book.latencies, 0.99),
        "mean_ms": round(statistics.fmean(book.latencies) * 1000, 4) if n_measured else None,
        "non_2xx": non_2xx,
        # admitted: answered 200; shed: answered 503 (overload), each timed like the rest
        "admitted_p50_ms": _quantile_ms(book.by_status.get(200, []), 0.5),
        "admitted_p99_ms": _quantile_ms(book.by_status.get(200, []), 0.99),
        "shed_p50_ms": _quantile_ms(book.by_status.get(503, []), 0.5),
        "shed_p99_ms": _quantile_ms(book.by_status.get(503, []), 0.99),
        "statuses": {str(k): v for k, v in sorted(book.statuses.items())},
        "all_statuses": {str(k): v for k, v in sorted(book.all_statuses.items())},
        "errors": book.errors + unfinished,
        "unfinished": unfinished,
        "connect_errors": pool.connect_errors,
        "protocol_errors": pool.protocol_errors,
        "max_connections": pool.max_seen,
        "dispatch_lag_p50_ms": lag_p50,
        "dispatch_lag_p99_ms": lag_p99,
        "send_overrun_ms": round(max(0.0, sent_end - schedule_end) * 1000, 3),
        "sustained": sustained,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/v2/models/cancer/infer")
    p.add_argument("--bodies", type=Path, required=True, help="request bodies, one per line")
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not measured")
    p.add_argument("--max-conns", type=int, default=256)
    p.add_argument("--preopen", type=int, default=32)
    p.add_argument("--drain-timeout", type=float, default=5.0)
    p.add_argument(
        "--trace",
        type=Path,
        help="write every measured request (due time from the window's start, seconds waited"
        " for a connection, latency, status, whether on a connection opened for it) as JSON",
    )
    args = p.parse_args(argv)
    bodies = [line for line in args.bodies.read_bytes().splitlines() if line.strip()]
    if not bodies or args.rate <= 0:
        p.error("need at least one body and a positive rate")
    result = uvloop.run(
        run_open_loop(
            host=args.host,
            port=args.port,
            path=args.path,
            bodies=bodies,
            rate=args.rate,
            duration=args.duration,
            warmup=args.warmup,
            max_conns=args.max_conns,
            preopen=args.preopen,
            drain_timeout=args.drain_timeout,
            trace=args.trace,
        )
    )
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")


if __name__ == "__main__":
    main()
