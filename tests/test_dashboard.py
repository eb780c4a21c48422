"""GET /dashboard in a real headless Chromium, against a real mlproxy serving real traffic.

Chromium runs as a subprocess while this test's event loop keeps serving the admin and data
planes; the test drives it over the DevTools protocol (a websocket), collects every console error
and uncaught exception, waits for the page to say it rendered, and checks a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import ClientSession, ClientWebSocketResponse, WSMsgType

from proxy.http.admin import create_admin_app
from proxy.monitoring.watch import HISTORY_EVERY_S

from .helpers import infer_body, model_section

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # the sandbox needs user namespaces, which a root container may not have
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,2000",
    "--remote-debugging-port=0",  # the browser picks a free port and prints it on stderr
]
DEADLINE_S = 15.0  # for each wait below; the whole test takes a few seconds
POLL_S = 0.05
BADGE = "document.getElementById('connection').textContent"
# The traffic is every demo row once (569 single-row requests) in this many rounds: v1 (90%)
# gets enough rows to fill its short window and score drift, v2 (10%) does not, so the page
# shows both scores and their absence.
ROUNDS = 6
SHADOW = '[models.cancer.shadow]\nprimary = "v1"\nmirrors = ["v2"]\n'


class DevTools:
    """A minimal Chrome DevTools Protocol client on one page's websocket: commands get answers
    by id, and the events that report page errors are kept in `problems` as (source, text)."""

    def __init__(self, ws: ClientWebSocketResponse) -> None:
        self.ws = ws
        self.problems: list[tuple[str, str]] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._pending[ident] = answer
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        return await asyncio.wait_for(answer, DEADLINE_S)

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def close(self) -> None:
        await self.ws.close()
        await self._reader

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            answer = self._pending.pop(data.get("id", -1), None)
            if answer is None:
                self._note(data.get("method"), data.get("params", {}))
            elif "error" in data:
                answer.set_exception(AssertionError(f"DevTools: {data['error']}"))
            else:
                answer.set_result(data.get("result", {}))
        for answer in self._pending.values():
            answer.cancel()

    def _note(self, method: str | None, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            thrown = details.get("exception", {}).get("description", details.get("text"))
            self.problems.append(("exception", str(thrown)))
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            args = [a.get("value", a.get("description")) for a in params["args"]]
            self.problems.append((f"console.{params['type']}", str(args)))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.problems.append((entry["source"], f"{entry['text']} {entry.get('url', '')}"))


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[DevTools]:
    """Headless Chromium with one blank page, driven over DevTools; killed on the way out."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium missing: run tools/ensure-debs.sh")
    proc = await asyncio.create_subprocess_exec(
        exe,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    stderr: list[bytes] = []
    drain: asyncio.Task[None] | None = None
    devtools: DevTools | None = None
    try:
        port = await asyncio.wait_for(_devtools_port(proc.stderr, stderr), DEADLINE_S)

        async def keep_draining() -> None:  # a full stderr pipe would stall the browser
            assert proc.stderr is not None
            while chunk := await proc.stderr.read(65536):
                stderr.append(chunk)

        drain = asyncio.create_task(keep_draining())
        async with ClientSession() as session:
            page = await _first_page(session, port)
            ws = await session.ws_connect(page, max_msg_size=0)  # screenshots are megabytes
            devtools = DevTools(ws)
            yield devtools
    finally:
        if devtools is not None:
            await devtools.close()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if drain is not None:
            await drain


async def _devtools_port(stream: asyncio.StreamReader, seen: list[bytes]) -> int:
    """Chromium prints `DevTools listening on ws://127.0.0.1:<port>/...` once it listens."""
    while line := await stream.readline():
        seen.append(line)
        if found := re.search(rb"DevTools listening on ws://[^:]+:(\d+)/", line):
            return int(found.group(1))
    pytest.fail(f"chromium exited before listening: {b''.join(seen).decode(errors='replace')}")


async def _first_page(session: ClientSession, port: int) -> str:
    """The websocket of the blank page Chromium opened (it may be listed a moment after start)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while loop.time() < deadline:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            pages = [t for t in await resp.json() if t["type"] == "page"]
        if pages:
            return str(pages[0]["webSocketDebuggerUrl"])
        await asyncio.sleep(POLL_S)
    pytest.fail("chromium opened no page")


async def wait_for(devtools: DevTools, expression: str, expected: Any) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    value = None
    while loop.time() < deadline:
        value = await devtools.evaluate(expression)
        if value == expected:
            return
        await asyncio.sleep(POLL_S)
    # The page reports a render that threw in data-error rather than on the console.
    error = await devtools.evaluate("document.body && document.body.dataset.error")
    pytest.fail(
        f"{expression} stayed {value!r}, expected {expected!r}; page error: {error!r};"
        f" problems: {devtools.problems}"
    )


async def open_dashboard(devtools: DevTools, url: str) -> None:
    """Navigate to the page and wait until its first render says it is done."""
    for domain in ("Runtime", "Log", "Page"):
        await devtools.call(f"{domain}.enable")
    navigated = await devtools.call("Page.navigate", url=url)
    assert "errorText" not in navigated, navigated
    await wait_for(devtools, "document.body && document.body.dataset.ready", "1")
    assert await devtools.evaluate("document.body.dataset.error ?? null") is None


def decode_png(data: bytes) -> np.ndarray[Any, Any]:
    """Pixels [height, width, channels] of an 8-bit, non-interlaced RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks = 8, {}
    idat = bytearray()
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length  # length, type, body, crc
        if kind == b"IDAT":
            idat += body
        chunks[kind] = body
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(bytes(idat)), dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind, row = raw[y, 0], raw[y, 1:]
        if kind == 0:
            cur = row.copy()
        elif kind == 1:  # Sub: each byte adds the reconstructed byte one pixel to its left
            cur = np.cumsum(row.reshape(width, bpp), axis=0, dtype=np.uint64).astype(np.uint8)
            cur = cur.reshape(stride)
        elif kind == 2:  # Up
            cur = row + prev
        else:  # Average and Paeth depend on the left byte just rebuilt: byte by byte
            cur = _unfilter_slow(int(kind), row.tolist(), prev.tolist(), bpp)
        out[y] = cur
        prev = cur
    return out.reshape(height, width, bpp)


def _unfilter_slow(kind: int, row: list[int], prev: list[int], bpp: int) -> np.ndarray[Any, Any]:
    cur = [0] * len(row)
    for i, value in enumerate(row):
        a = cur[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        if kind == 3:
            pred = (a + b) // 2
        else:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
        cur[i] = (value + pred) & 0xFF
    return np.asarray(cur, dtype=np.uint8)


async def test_dashboard_renders_live_traffic_without_errors(
    start: Any,
    write_config: Any,
    model_repo: Path,
    cancer_rows: Any,
    aiohttp_server: Any,
    tmp_path: Path,
) -> None:
    # A short window of 200 rows (not 2000) so that v1's drift is scored within this traffic.
    tables = (
        "[models.cancer.canary]\nweights = { v1 = 90, v2 = 10 }\n"
        "[models.cancer.drift]\nwindow = 200\nlong_window = 1000\n"
    )
    client, serving = await start(
        write_config(model_section(mode="canary", repo=model_repo) + tables)
    )
    # Every row once, in rounds; after each round the monitors' step function samples one point
    # of latency history (the server calls it every 0.25 s; here `now` steps one interval).
    for step, rows in enumerate(np.array_split(cancer_rows, ROUNDS)):
        for i in range(len(rows)):
            resp = await client.post("/v2/models/cancer/infer", json=infer_body(rows[i : i + 1]))
            assert resp.status == 200
        serving.scheduler.housekeeping(now=step * HISTORY_EVERY_S)
    admin = await aiohttp_server(create_admin_app(serving))
    # Kept beside the screenshot: what the page was given, for whoever reads a failure.
    async with ClientSession() as session, session.get(admin.make_url("/admin/monitor")) as resp:
        (tmp_path / "monitor.json").write_bytes(await resp.read())

    async with chromium(tmp_path / "profile") as devtools:
        await open_dashboard(devtools, str(admin.make_url("/dashboard")))
        assert await devtools.evaluate("document.title") == "mlproxy dashboard"
        assert await devtools.evaluate("document.body.dataset.models") == "1"
        assert await devtools.evaluate(BADGE) == "live"
        text = await devtools.evaluate("document.body.innerText")
        assert "mean_radius" in text
        assert re.search(r"PSI \d\.\d{3}", text), "no feature shows a PSI score"
        # optimizeForSpeed: a lightly compressed PNG, quick to decode here.
        shot = await devtools.call("Page.captureScreenshot", format="png", optimizeForSpeed=True)
        problems = list(devtools.problems)

    png = base64.b64decode(shot["data"])
    (tmp_path / "dashboard.png").write_bytes(png)
    pixels = decode_png(png)[:, :, :3].astype(np.int32)
    colours = np.unique((pixels[:, :, 0] << 16) | (pixels[:, :, 1] << 8) | pixels[:, :, 2])
    # Text and grey frames are unsaturated; the split bar, histograms and drift bars are not.
    saturated = (pixels.max(axis=2) - pixels.min(axis=2) > 60).mean()
    assert problems == []
    assert pixels.shape[0] > 500 and pixels.shape[1] > 1000, pixels.shape
    # Measured: ~2000 colours and ~10% coloured pixels; with no traffic (only the split bar in
    # colour) ~800 and ~1%; a blank page has one colour.
    assert len(colours) > 500, f"{len(colours)} distinct colours: a blank page? ({tmp_path})"
    assert saturated > 0.05, f"only {saturated:.2%} of pixels are coloured ({tmp_path})"


async def test_dashboard_without_data_and_through_an_outage(
    start: Any, write_config: Any, model_repo: Path, aiohttp_server: Any, tmp_path: Path
) -> None:
    """No traffic yet (nulls and empty lists everywhere) renders cleanly; when the admin server
    goes away the page says so and keeps its last render, and recovers when it is back."""
    _, serving = await start(write_config(model_section(mode="shadow", repo=model_repo) + SHADOW))
    admin = await aiohttp_server(create_admin_app(serving))
    port = admin.port

    async with chromium(tmp_path / "profile") as devtools:
        await open_dashboard(devtools, str(admin.make_url("/dashboard")))
        assert devtools.problems == []
        assert await devtools.evaluate(BADGE) == "live"

        await admin.close()
        await wait_for(devtools, BADGE, "disconnected")
        assert await devtools.evaluate("document.querySelectorAll('[data-model]').length") == 1

        await aiohttp_server(create_admin_app(serving), port=port)
        await wait_for(devtools, BADGE, "live")
        # The browser itself logs each refused connection; nothing else may be reported.
        problems = [
            p for p in devtools.problems if not (p[0] == "network" and "/admin/monitor" in p[1])
        ]
    assert problems == []
