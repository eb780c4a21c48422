"""`workers = 2` end to end (proxy/scaleout.py): a real `mlproxy serve` supervisor and its two
worker processes on one real port, driven over real HTTP: pooled counts in /admin/status and
/metrics equal what was sent, a worker killed with -9 is restarted and the counts never go
backwards, SIGHUP converges every worker on the new config (and a refused reload reaches none),
SIGTERM exits 0 and leaves no shared memory behind."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from proxy.config.load import load_config
from proxy.engine.shared import owned_by

from .helpers import free_port, infer_body, serve_process, shipped_config, until

PREVIEW = {"MLPROXY_PREVIEW_WORKERS": "1"}
CONNECTIONS = 32


async def _status(http: aiohttp.ClientSession, admin: int) -> dict[str, Any]:
    async with http.get(f"http://127.0.0.1:{admin}/admin/status") as resp:
        assert resp.status == 200
        doc: dict[str, Any] = await resp.json()
        return doc


def _served(status: dict[str, Any]) -> int:
    versions = status["models"]["cancer"]["versions"]
    return sum(int(v["requests"]) for v in versions.values())


async def _send(http: aiohttp.ClientSession, port: int, rows: np.ndarray[Any, Any], n: int) -> int:
    """`n` requests over CONNECTIONS concurrent keep-alive connections; returns how many got 200."""
    url = f"http://127.0.0.1:{port}/v2/models/cancer/infer"
    body = infer_body(rows[:1])
    ok = 0

    async def client(count: int) -> None:
        nonlocal ok
        for _ in range(count):
            async with http.post(url, json=body) as resp:
                await resp.read()
                ok += resp.status == 200

    share = [n // CONNECTIONS + (i < n % CONNECTIONS) for i in range(CONNECTIONS)]
    await asyncio.gather(*(client(c) for c in share))
    return ok


async def _metric_requests(http: aiohttp.ClientSession, admin: int) -> float:
    async with http.get(f"http://127.0.0.1:{admin}/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mlproxy_requests_total{")
    )


async def test_two_workers_pool_counts_survive_a_kill_and_converge_on_sighup(
    tmp_path: Path, model_repo: Path, cancer_rows: np.ndarray[Any, Any]
) -> None:
    port, admin = free_port(), free_port()
    path = shipped_config(tmp_path, model_repo, port=port, admin=admin, workers=2)
    # a progressive canary (steps an hour apart: none is taken in the test) that the
    # supervisor's controller decides
    path.write_text(
        path.read_text()
        .replace("# steps = [10, 25, 50, 100]", "steps = [10, 25, 50, 100]")
        .replace("# step_interval_s = 60", "step_interval_s = 3600")
    )
    digest = load_config(path).digest
    connector = aiohttp.TCPConnector(limit=CONNECTIONS, force_close=False)
    with serve_process(path, port, env=PREVIEW) as served:
        supervisor = served.proc.pid
        async with aiohttp.ClientSession(connector=connector) as http:

            async def both_serve() -> bool:
                ws = (await _status(http, admin))["workers"]
                return len(ws) == 2 and all(w["digest"] == digest for w in ws)

            await until(both_serve, "both workers publish the config digest", timeout=30)
            first = {w["slot"]: w["pid"] for w in (await _status(http, admin))["workers"]}
            assert supervisor not in first.values() and len(set(first.values())) == 2

            sent = 3000
            assert await _send(http, port, cancer_rows, sent) == sent

            async def pooled_all() -> bool:
                return _served(await _status(http, admin)) == sent

            await until(pooled_all, f"status counts all {sent} requests", timeout=10)
            status = await _status(http, admin)
            per_worker = [w["requests"] for w in status["workers"]]
            assert sum(per_worker) == sent and all(n > 0 for n in per_worker), per_worker
            assert await _metric_requests(http, admin) == sent

            # kill -9 of a worker: restarted in its slot; its counts stay in the pool
            os.kill(first[1], signal.SIGKILL)

            async def restarted() -> bool:
                ws = {w["slot"]: w for w in (await _status(http, admin))["workers"]}
                w = ws.get(1)
                return (
                    w is not None
                    and w["pid"] != first[1]
                    and w["restarts"] == 1
                    and w["digest"] == digest
                )

            await until(restarted, "worker 1 is restarted and serving", timeout=30)
            assert _served(await _status(http, admin)) == sent  # never backwards
            assert await _send(http, port, cancer_rows, 200) == 200

            async def pooled_more() -> bool:
                return _served(await _status(http, admin)) == sent + 200

            await until(pooled_more, "status counts the requests after the restart")

            # the supervisor's controller decides for all: after a rollback no worker routes
            # a request to the canary (its decision reaches each worker through shared memory)
            async with http.post(f"http://127.0.0.1:{admin}/admin/models/cancer/rollback") as r:
                assert r.status == 200, await r.text()
            await _await_canary_off(http, port, admin, cancer_rows)

            # a reload the supervisor refuses reaches no worker
            good = path.read_text()
            path.write_text(good.replace("stable = ", "stable_typo = ", 1))
            os.kill(supervisor, signal.SIGHUP)

            async def refused() -> bool:
                return (await _status(http, admin))["config"]["last_error"] is not None

            await until(refused, "the supervisor refuses the broken config")
            assert all(w["digest"] == digest for w in (await _status(http, admin))["workers"])

            # a reload it takes converges every worker on the new digest
            path.write_text(
                good.replace("v1 = 90, v2 = 10", "v1 = 50, v2 = 50").replace(
                    "steps = [10, 25, 50, 100]", "steps = [50, 100]"
                )
            )
            new = load_config(path).digest
            assert new != digest
            os.kill(supervisor, signal.SIGHUP)

            async def converged() -> bool:
                s = await _status(http, admin)
                return s["config"]["digest"] == new and all(
                    w["digest"] == new for w in s["workers"]
                )

            await until(converged, "every worker serves the new config", timeout=30)
            assert (await _status(http, admin))["models"]["cancer"]["weights"] == {
                "v1": 0.5,
                "v2": 0.5,
            }
            assert await _send(http, port, cancer_rows, 100) == 100
            workers = [w["pid"] for w in (await _status(http, admin))["workers"]]
    assert served.proc.returncode == 0, served.output
    for noise in ("Traceback", "resource_tracker"):
        assert noise not in served.output, served.output
    assert owned_by(supervisor) == [], "shared memory left behind"
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), f"worker {pid} outlived"


async def _await_canary_off(
    http: aiohttp.ClientSession, port: int, admin: int, rows: np.ndarray[Any, Any]
) -> None:
    """Poll until a batch of 200 requests sends none to v2 (each worker took the rollback)."""

    async def none_to_v2() -> bool:
        before = (await _status(http, admin))["models"]["cancer"]["versions"]["v2"]["requests"]
        total = _served(await _status(http, admin)) + 200
        assert await _send(http, port, rows, 200) == 200

        async def counted() -> bool:
            return _served(await _status(http, admin)) == total

        await until(counted, "the batch is counted")
        after = (await _status(http, admin))["models"]["cancer"]["versions"]["v2"]["requests"]
        return bool(after == before)

    await until(none_to_v2, "every worker follows the rollback", timeout=20, every_s=0.05)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


async def test_two_workers_judge_drift_once_on_pooled_windows(
    tmp_path: Path, model_repo: Path, cancer_rows: np.ndarray[Any, Any]
) -> None:
    """Each worker sees about half of the traffic; the supervisor judges the pooled windows
    (2,000 rows), so a shift of mean_area raises one drift alert, not one per worker, and
    clean traffic before it raises none."""
    port, admin = free_port(), free_port()
    path = shipped_config(tmp_path, model_repo, port=port, admin=admin, workers=2)
    path.write_text(path.read_text().replace('mode = "canary"', 'mode = "single"', 1))
    rng = np.random.default_rng(11)
    sd = cancer_rows.std(axis=0)
    url = f"http://127.0.0.1:{port}/v2/models/cancer/infer"

    async def send(http: aiohttp.ClientSession, shift: float, requests: int) -> None:
        async def client(count: int) -> None:
            for _ in range(count):
                x = cancer_rows[rng.integers(0, len(cancer_rows), 10)].copy()
                x[:, 3] += shift * sd[3]  # mean_area
                async with http.post(url, json=infer_body(x)) as resp:
                    assert resp.status == 200, await resp.text()

        await asyncio.gather(*(client(requests // 8) for _ in range(8)))

    async def drift_alerts(http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        async with http.get(f"http://127.0.0.1:{admin}/admin/alerts") as resp:
            doc = await resp.json()
        return [a for a in doc["alerts"] if a["kind"] == "drift" and a["state"] == "firing"]

    with serve_process(path, port, env=PREVIEW):
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                ws = (await _status(http, admin))["workers"]
                return len(ws) == 2 and all(w["digest"] for w in ws)

            await until(ready, "both workers serve", timeout=30)
            await send(http, 0.0, 400)  # 4,000 clean rows: two windows

            async def judged(rows: int) -> bool:
                return await _monitor_rows(http, admin) >= rows

            await until(lambda: judged(4000), "the supervisor's windows take 4,000 rows")
            assert await drift_alerts(http) == []
            await send(http, 1.0, 400)  # 4,000 rows shifted by 1 sd
            await until(lambda: judged(8000), "the supervisor's windows take 8,000 rows")

            async def one_alert() -> bool:
                return len(await drift_alerts(http)) > 0

            await until(one_alert, "a drift alert")
            area = [a for a in await drift_alerts(http) if a.get("feature") == "mean_area"]
            assert len(area) == 1, area
            status = await _status(http, admin)
            per_worker = [w["requests"] for w in status["workers"]]
            assert all(n > 0 for n in per_worker), per_worker


async def _monitor_rows(http: aiohttp.ClientSession, admin: int) -> int:
    """Rows the supervisor's monitor of cancer/v1 has pooled so far."""
    v1 = (await _status(http, admin))["models"]["cancer"]["versions"]["v1"]
    return int(v1["monitoring"]["rows_seen"])


async def test_feedback_joins_across_workers(
    tmp_path: Path, model_repo: Path, cancer_rows: np.ndarray[Any, Any]
) -> None:
    """Answers from both workers, each on a new connection (so the kernel spreads them), and
    feedback for each on a new connection too: about half reach the other worker than the
    answer's, and every one joins (per-worker stores would answer those 404), once; the
    pooled labelled rows count them all."""
    port, admin = free_port(), free_port()
    path = shipped_config(tmp_path, model_repo, port=port, admin=admin, workers=2)
    path.write_text(path.read_text().replace('mode = "canary"', 'mode = "single"', 1))
    base = f"http://127.0.0.1:{port}/v2/models/cancer"
    n = 120
    with serve_process(path, port, env=PREVIEW):
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def ready() -> bool:
                ws = (await _status(http, admin))["workers"]
                return len(ws) == 2 and all(w["digest"] for w in ws)

            await until(ready, "both workers serve", timeout=30)
            answers = []
            for i in range(n):
                body = infer_body(cancer_rows[i : i + 1])
                if i % 3 == 0:
                    body["id"] = f"client-{i}"  # the client's own id: found by hash
                async with http.post(f"{base}/infer", json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    doc = await resp.json()
                answers.append((doc["id"], int(np.asarray(doc["outputs"][0]["data"])[0])))

            async def counted() -> bool:
                return sum(w["requests"] for w in (await _status(http, admin))["workers"]) == n

            await until(counted, f"the workers publish {n} requests")
            status = await _status(http, admin)
            assert all(w["requests"] > 0 for w in status["workers"]), status["workers"]
            for rid, label in answers:
                async with http.post(f"{base}/feedback", json={"id": rid, "label": label}) as r:
                    assert r.status == 200, (rid, await r.text())
            rid, label = answers[0]
            async with http.post(f"{base}/feedback", json={"id": rid, "label": label}) as r:
                assert r.status == 404  # joined once

            async def all_labelled() -> bool:
                v1 = (await _status(http, admin))["models"]["cancer"]["versions"]["v1"]
                return bool(v1["monitoring"]["accuracy"]["labelled_rows"] == n)

            await until(all_labelled, f"the supervisor counts {n} labelled rows")
            v1 = (await _status(http, admin))["models"]["cancer"]["versions"]["v1"]
            assert v1["monitoring"]["accuracy"]["short"] == 1.0  # every label was the answer


async def test_kill_9_of_a_worker_under_load_fails_only_its_in_flight_requests(
    tmp_path: Path, model_repo: Path, cancer_rows: np.ndarray[Any, Any]
) -> None:
    """32 keep-alive clients, each with one request in flight at a time; one worker is killed
    with -9 mid-load. A client whose connection dies with it loses at most the one request it
    had in flight, reconnects and goes on: every other request is answered 200, the killed
    worker is restarted, and no request is refused."""
    port, admin = free_port(), free_port()
    path = shipped_config(tmp_path, model_repo, port=port, admin=admin, workers=2)
    body = orjson.dumps(infer_body(cancer_rows[:1]))
    request = (
        b"POST /v2/models/cancer/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    answered: dict[int, int] = {}
    lost = 0
    stop = asyncio.Event()

    async def client() -> None:
        nonlocal lost
        for _ in range(1000):  # connections, bounded
            if stop.is_set():
                return
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                for _ in range(100_000):
                    if stop.is_set():
                        return
                    writer.write(request)
                    try:
                        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
                        n = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n")[0])
                        await reader.readexactly(n)
                    except (asyncio.IncompleteReadError, ConnectionError):
                        lost += 1
                        break  # reconnect
                    status = int(head.split(b" ", 2)[1])
                    answered[status] = answered.get(status, 0) + 1
            finally:
                writer.close()

    with serve_process(path, port, env=PREVIEW) as served:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                ws = (await _status(http, admin))["workers"]
                return len(ws) == 2 and all(w["digest"] for w in ws)

            await until(ready, "both workers serve", timeout=30)
            victim = {w["slot"]: w["pid"] for w in (await _status(http, admin))["workers"]}[1]
            clients = [asyncio.create_task(client()) for _ in range(CONNECTIONS)]
            await until(lambda: sum(answered.values()) >= 2000, "the load is going")
            os.kill(victim, signal.SIGKILL)

            async def restarted() -> bool:
                ws = {w["slot"]: w for w in (await _status(http, admin))["workers"]}
                return 1 in ws and ws[1]["pid"] != victim and ws[1]["digest"] is not None

            await until(restarted, "the killed worker is restarted", timeout=30)
            before = sum(answered.values())
            await until(lambda: sum(answered.values()) >= before + 2000, "load after restart")
            stop.set()
            await asyncio.wait_for(asyncio.gather(*clients), 30)
    print(f"lost {lost} of {sum(answered.values()) + lost} requests")  # shown with -s
    assert lost <= CONNECTIONS, (lost, served.output[-2000:])
    assert set(answered) == {200}, answered
    assert "Traceback" not in served.output
