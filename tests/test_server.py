"""The whole server: the drain on stop (and its timeout), what a reload cannot change, SIGHUP and
file-change reloads in a real process."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.config.load import load_config
from proxy.server import serve

from .helpers import (
    BASE_CONFIG,
    free_port,
    http_get,
    infer_body,
    model_section,
    serve_process,
    shipped_config,
)


def server_toml(tmp_path: Path, models: str) -> tuple[Path, int, int]:
    """A config file with real ports for serve() in this process: (path, data port, admin port)."""
    port, admin = free_port(), free_port()
    path = tmp_path / "server.toml"
    path.write_text(listening(port, admin) + models)
    return path, port, admin


def listening(port: int, admin: int) -> str:
    base = BASE_CONFIG.format(max_body=4194304, max_inflight=512)
    return base.replace("port = 0", f"port = {port}") + f"[admin]\nport = {admin}\n"


def with_remote_v3(model_repo: Path, url: str) -> str:
    """cancer v1 local, v3 the gated upstream (30 s timeout: only the drain can cut it off)."""
    versions = {
        "v1": f'{{ path = "{model_repo}/cancer/v1" }}',
        "v3": f'{{ url = "{url}", timeout_ms = 30000 }}',
    }
    return model_section(repo=model_repo, versions=versions)


def audit_of(path: Path) -> list[dict[str, Any]]:
    audit = path.with_name(path.stem + ".audit.jsonl")
    return [orjson.loads(line) for line in audit.read_bytes().splitlines()]


@dataclass
class Running:
    """serve() running in this test's loop: set `stop` to begin the drain."""

    task: asyncio.Future[None]
    stop: asyncio.Event
    draining: asyncio.Event


@pytest.fixture
async def serve_in_process() -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """serve_in_process(path, drain_timeout_s=...) -> Running, once both planes listen; stopped
    (and awaited) at teardown if the test did not."""
    started: list[Running] = []

    async def _serve(path: Path, *, drain_timeout_s: float = 30.0) -> Running:
        stop, ready, draining = asyncio.Event(), asyncio.Event(), asyncio.Event()
        task = asyncio.ensure_future(
            serve(
                load_config(path),
                stop=stop,
                drain_timeout_s=drain_timeout_s,
                ready=ready,
                draining=draining,
            )
        )
        running = Running(task, stop, draining)
        started.append(running)
        listening = asyncio.ensure_future(ready.wait())
        await asyncio.wait({listening, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        if task.done():
            task.result()  # serve failed to start: raise its error here
        assert ready.is_set(), "serve() did not listen within 30 s"
        return running

    yield _serve
    for running in started:
        running.stop.set()
        await asyncio.wait_for(running.task, timeout=60)


def restart_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "takes effect at the next restart" in r.getMessage()
    ]


def refuses(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


async def test_stop_drains_requests_in_flight_and_refuses_new_ones(
    tmp_path: Path,
    model_repo: Path,
    gated_upstream: Any,
    serve_in_process: Any,
    cancer_rows: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    up, _, url = gated_upstream
    path, port, _ = server_toml(tmp_path, with_remote_v3(model_repo, url))
    running = await serve_in_process(path, drain_timeout_s=30)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        up.gate.clear()
        held = asyncio.ensure_future(
            http.post(
                base + "/v2/models/cancer/versions/v3/infer", json=infer_body(cancer_rows[:1])
            )
        )
        await asyncio.wait_for(up.first_received.wait(), timeout=10)
        with caplog.at_level(logging.INFO, logger="mlproxy"):
            running.stop.set()
            await asyncio.wait_for(running.draining.wait(), timeout=10)  # listening socket closed
            assert refuses(port), "still accepting connections after stop"
            assert not running.task.done()  # still draining the held request
            up.gate.set()
            resp = await asyncio.wait_for(held, timeout=10)
            assert resp.status == 200 and resp.headers["x-model-version"] == "v3"
            await asyncio.wait_for(running.task, timeout=30)
    assert audit_of(path)[-1]["event"] == "stop" and audit_of(path)[-1]["drained"] is True
    assert not [r for r in caplog.records if "drain timeout" in r.getMessage()]


async def test_stop_cuts_off_a_request_still_in_flight_at_the_drain_timeout(
    tmp_path: Path,
    model_repo: Path,
    gated_upstream: Any,
    serve_in_process: Any,
    cancer_rows: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """serve() waits for requests in flight no longer than drain_timeout_s: it returns while the
    upstream still holds the request (its gate never opens), says so in the log and the audit."""
    up, _, url = gated_upstream
    path, port, _ = server_toml(tmp_path, with_remote_v3(model_repo, url))
    running = await serve_in_process(path, drain_timeout_s=0.5)
    async with aiohttp.ClientSession() as http:
        up.gate.clear()
        held = asyncio.ensure_future(
            http.post(
                f"http://127.0.0.1:{port}/v2/models/cancer/versions/v3/infer",
                json=infer_body(cancer_rows[:1]),
            )
        )
        await asyncio.wait_for(up.first_received.wait(), timeout=10)
        with caplog.at_level(logging.INFO, logger="mlproxy"):
            running.stop.set()
            await asyncio.wait_for(running.draining.wait(), timeout=10)
            assert not running.task.done()  # draining: it waits for the held request first
            await asyncio.wait_for(running.task, timeout=30)  # ...but not for the upstream
        assert not up.gate.is_set() and up.answered == 0  # the request was still held
        with pytest.raises(aiohttp.ClientError):  # cut off: the connection closes unanswered
            await asyncio.wait_for(held, timeout=10)
    stop = audit_of(path)[-1]
    assert stop["event"] == "stop" and stop["drained"] is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "drain timeout: 1 request(s) still in flight are cut off" in warnings


async def test_a_reload_warns_that_server_and_admin_changes_wait_for_a_restart(
    tmp_path: Path,
    model_repo: Path,
    serve_in_process: Any,
    cancer_rows: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """[server] and [admin] are read once, at start: a reload that changes them says so and
    both planes stay on their old ports; a reload that changes neither says nothing of it."""
    models = model_section(repo=model_repo)
    path, port, admin = server_toml(tmp_path, models)
    await serve_in_process(path)
    new_port, new_admin = free_port(), free_port()
    body = infer_body(cancer_rows[:1])

    async def reload(http: aiohttp.ClientSession, text: str) -> list[str]:
        """Rewrite the file whole (the watcher sees the old or the new one, never half) and
        reload through the old admin port; the warnings of whichever reload saw the change."""
        caplog.clear()
        new = path.with_name("server.toml.new")
        new.write_text(text)
        new.replace(path)
        resp = await http.post(f"http://127.0.0.1:{admin}/admin/reload")
        assert resp.status == 200 and (await resp.json())["outcome"] == "ok"
        return restart_warnings(caplog)

    async def answered_by(http: aiohttp.ClientSession) -> str:
        resp = await http.post(f"http://127.0.0.1:{port}/v2/models/cancer/infer", json=body)
        assert resp.status == 200
        return resp.headers["x-model-version"]

    with caplog.at_level(logging.WARNING, logger="mlproxy"):
        async with aiohttp.ClientSession() as http:
            warned = await reload(http, listening(new_port, admin) + models)
            assert warned == ["[server] changed: it takes effect at the next restart"]
            assert await answered_by(http) == "v1" and refuses(new_port)
            warned = await reload(http, listening(new_port, new_admin) + models)
            assert warned == ["[admin] changed: it takes effect at the next restart"]
            assert refuses(new_admin)  # and the old admin port answers the next reload:
            on_v2 = models.replace('stable = "v1"', 'stable = "v2"')
            assert await reload(http, listening(new_port, new_admin) + on_v2) == []
            assert await answered_by(http) == "v2"  # that reload is in force, on the old port


def _status(admin: int) -> dict[str, Any]:
    return orjson.loads(http_get(f"http://127.0.0.1:{admin}/admin/status")[2])


def test_sighup_and_file_change_reload_a_running_process(tmp_path: Path, model_repo: Path) -> None:
    port, admin = free_port(), free_port()
    path = shipped_config(tmp_path, model_repo, port=port, admin=admin)
    with serve_process(path, port) as served:
        first = _status(admin)["config"]["digest"]
        # an edit noticed by the file watcher (write-and-rename, like an editor)
        new = tmp_path / "config.toml.new"
        new.write_text(path.read_text().replace('mode = "canary"', 'mode = "blue_green"'))
        new.replace(path)
        served.wait_for_line("reloaded (file changed)")
        assert _status(admin)["models"]["cancer"]["mode"] == "blue_green"
        second = _status(admin)["config"]["digest"]
        assert second != first
        # SIGHUP reloads too (an in-place edit first, in case the watcher is faster, is fine)
        path.write_text(path.read_text().replace('active = "blue"', 'active = "green"'))
        served.proc.send_signal(signal.SIGHUP)
        served.wait_for_line("reloaded (SIGHUP)")
        assert _status(admin)["models"]["cancer"]["weights"] == {"v2": 1.0}
        # a bad edit is refused and shown, the running config keeps serving
        path.write_text(path.read_text() + "\n[nonsense\n")
        served.proc.send_signal(signal.SIGHUP)
        served.wait_for_line("reload (SIGHUP) refused")
        assert "invalid TOML" in _status(admin)["config"]["last_error"]
        assert _status(admin)["models"]["cancer"]["weights"] == {"v2": 1.0}
    assert served.proc.returncode == 0
    assert "reload (SIGHUP) refused" in served.output
