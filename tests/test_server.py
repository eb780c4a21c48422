"""The whole server: graceful drain on stop, SIGHUP and file-change reloads in a real process."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import orjson

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
from .upstream import start_upstream


async def test_stop_drains_requests_in_flight_and_refuses_new_ones(
    tmp_path: Path,
    model_repo: Path,
    start: Any,
    write_config: Any,
    aiohttp_raw_server: Any,
    cancer_rows: Any,
) -> None:
    _, upstream_serving = await start(write_config(model_section(repo=model_repo)))
    up, _, url = await start_upstream(aiohttp_raw_server, upstream_serving)
    port, admin = free_port(), free_port()
    versions = {
        "v1": f'{{ path = "{model_repo}/cancer/v1" }}',
        "v3": f'{{ url = "{url}", timeout_ms = 30000 }}',
    }
    text = (
        BASE_CONFIG.format(max_body=4194304, max_inflight=512).replace("port = 0", f"port = {port}")
        + f"[admin]\nport = {admin}\n"
        + model_section(repo=model_repo, versions=versions)
    )
    path = tmp_path / "server.toml"
    path.write_text(text)
    stop = asyncio.Event()
    ready, draining = asyncio.Event(), asyncio.Event()
    server = asyncio.ensure_future(
        serve(load_config(path), stop=stop, drain_timeout_s=30, ready=ready, draining=draining)
    )
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        await asyncio.wait_for(ready.wait(), timeout=30)
        up.gate.clear()
        held = asyncio.ensure_future(
            http.post(
                base + "/v2/models/cancer/versions/v3/infer", json=infer_body(cancer_rows[:1])
            )
        )
        await asyncio.wait_for(up.first_received.wait(), timeout=10)
        stop.set()
        await asyncio.wait_for(draining.wait(), timeout=10)  # the listening socket is closed
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "still accepting connections after stop"
        assert not server.done()  # still draining the held request
        up.gate.set()
        resp = await asyncio.wait_for(held, timeout=10)
        assert resp.status == 200 and resp.headers["x-model-version"] == "v3"
        await asyncio.wait_for(server, timeout=30)
    audit = [
        orjson.loads(line) for line in (tmp_path / "server.audit.jsonl").read_bytes().splitlines()
    ]
    assert audit[-1]["event"] == "stop" and audit[-1]["drained"] is True


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
