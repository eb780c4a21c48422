"""Lossless shutdown: SIGTERM to a real `mlproxy serve` under keep-alive load answers every
request it received (each answer during the drain says Connection: close), closes idle
connections, and exits 0."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from .helpers import BASE_CONFIG, free_port, infer_body, model_section, serve_process

pytestmark = pytest.mark.timeout(120)
CONNECTIONS = 64
LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


@dataclass
class Tally:
    answered: int = 0
    lost: int = 0  # a request written whose connection closed before its answer
    told_to_close: int = 0  # connections that ended on an answer with Connection: close
    refused: int = 0  # reconnects the closed listener refused (not requests: never sent)
    statuses: dict[int, int] | None = None
    target: int = 20 * CONNECTIONS  # answers before the SIGTERM
    loaded: asyncio.Event = field(default_factory=asyncio.Event)  # set once `target` answered


async def keep_sending(port: int, request: bytes, tally: Tally, stop_at: float) -> None:
    """One keep-alive connection sending a request as soon as the last is answered, until the
    server tells it to close (then it tries to reconnect once: the listener must be closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(100_000):
            if time.monotonic() > stop_at:
                return
            writer.write(request)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            except (asyncio.IncompleteReadError, ConnectionError):
                tally.lost += 1
                return
            m = LENGTH.search(head)
            assert m, head
            await reader.readexactly(int(m.group(1)))
            status = int(head.split(b" ", 2)[1])
            assert tally.statuses is not None
            tally.statuses[status] = tally.statuses.get(status, 0) + 1
            tally.answered += 1
            if tally.answered >= tally.target:
                tally.loaded.set()
            if b"\r\nconnection: close" in head.lower():
                tally.told_to_close += 1
                break
    finally:
        writer.close()
    try:
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()
    except ConnectionError:
        tally.refused += 1


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_under_keepalive_load_loses_no_request(
    tmp_path: Path, model_repo: Path, cancer_rows: Any, workers: int
) -> None:
    """One process, or a supervisor and two workers (each drains its own connections)."""
    port = free_port()
    base = BASE_CONFIG.format(max_body=4194304, max_inflight=512)
    path = tmp_path / "config.toml"
    path.write_text(
        base.replace("port = 0", f"port = {port}\nworkers = {workers}")
        + f"[admin]\nport = {free_port()}\n"
        + model_section(repo=model_repo)
    )
    body = orjson.dumps(infer_body(cancer_rows[:1]))
    request = (
        b"POST /v2/models/cancer/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    tally = Tally(statuses={})
    env = {"MLPROXY_PREVIEW_WORKERS": "1"} if workers > 1 else None
    with serve_process(path, port, env=env) as served:
        if workers > 1:  # the supervisor logs "serving" before its workers listen
            for _ in range(workers):
                served.wait_for_line("serving " + str(path), timeout=30)
        stop_at = time.monotonic() + 60
        clients = [
            asyncio.create_task(keep_sending(port, request, tally, stop_at))
            for _ in range(CONNECTIONS)
        ]
        await asyncio.wait_for(tally.loaded.wait(), 30)  # the load is going
        served.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*clients), 60)
        code = await asyncio.to_thread(served.proc.wait, 30)
    assert code == 0, served.output
    assert tally.lost == 0, (tally, served.output[-2000:])
    assert tally.told_to_close == CONNECTIONS, tally  # every connection was told, on an answer
    assert tally.refused == CONNECTIONS  # and the listener was closed when it came back
    assert tally.statuses == {200: tally.answered}, tally.statuses
