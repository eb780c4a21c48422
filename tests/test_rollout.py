"""Progressive canary, automatic rollback, fallback, state across restarts, the admin API."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.config.schema import VersionKey
from proxy.http.admin import create_admin_app
from proxy.http.data import create_data_plane
from proxy.runtime.serving import close_serving, create_serving

from .badmodels import build_broken, build_wrong
from .helpers import infer_body, model_section


def canary(
    repo: Path, canary_version: str, *, weights: str, extra: str = "", sticky: bool = True
) -> str:
    versions = {
        "v1": f'{{ path = "{repo}/cancer/v1" }}',
        canary_version: f'{{ path = "{repo}/cancer/{canary_version}" }}',
    }
    head = model_section(
        mode="canary",
        repo=repo,
        versions=versions,
        extra='sticky_key = "x-user-id"' if sticky else "",
    )
    return head + f"[models.cancer.canary]\nweights = {{ {weights} }}\n{extra}"


async def send(client: Any, rows: Any, n: int, *, offset: int = 0) -> list[str]:
    """n requests from n different users; every one must be answered 200. Returns who answered."""
    versions = []
    for i in range(n):
        resp = await client.post(
            "/v2/models/cancer/infer",
            json=infer_body(rows[(offset + i) % len(rows)][None, :]),
            headers={"x-user-id": f"user-{offset + i}"},
        )
        assert resp.status == 200, await resp.text()
        versions.append(resp.headers["x-model-version"])
    return versions


async def test_canary_steps_up_while_gates_hold_then_promotes(
    start: Any, write_config: Any, repo: Path, cancer_rows: Any
) -> None:
    extra = "steps = [25, 50, 100]\nstep_interval_s = 10\ngates = { max_error_rate = 0.05, max_p99_ms = 10000, min_requests = 20 }\n"
    client, serving = await start(
        write_config(canary(repo, "v2", weights="v1 = 90, v2 = 10", extra=extra))
    )
    c = serving.rollouts.get("cancer")
    t0 = c.step_started
    assert c.weight == pytest.approx(10.0) and c.status == "progressing"
    assert c.tick(t0 + 11) == "wait"  # no canary traffic yet: too few samples to judge
    await send(client, cancer_rows, 400)
    assert c.tick(t0 + 5) is None  # gates hold, but the step interval has not passed
    assert c.tick(t0 + 11) == "step" and c.weight == 25.0
    assert serving.plan.models["cancer"].strategy.split() == {"v1": 0.75, "v2": 0.25}
    await send(client, cancer_rows, 200, offset=400)
    assert c.tick(t0 + 22) == "step" and c.weight == 50.0
    await send(client, cancer_rows, 100, offset=600)
    assert c.tick(t0 + 33) == "promote" and c.status == "promoted"
    assert set(await send(client, cancer_rows, 30, offset=700)) == {"v2"}
    events = [e["event"] for e in serving.audit.read()]
    assert events[-3:] == ["rollout_step", "rollout_step", "rollout_promote"]
    serving.writer.wait_written()
    saved = orjson.loads(serving.state.path.read_bytes())["models"]["cancer"]
    assert saved["status"] == "promoted" and saved["weight"] == 100.0


async def test_wrong_answers_roll_back_automatically_without_a_client_error(
    start: Any, write_config: Any, repo: Path, cancer_rows: Any
) -> None:
    build_wrong(repo)
    extra = "gates = { min_agreement = 0.9, min_requests = 20 }\n"
    client, serving = await start(
        write_config(canary(repo, "wrong", weights="v1 = 50, wrong = 50", extra=extra))
    )
    answered = await send(client, cancer_rows, 120)
    assert answered.count("wrong") >= 20
    await asyncio.wait_for(serving.plan.models["cancer"].lanes["v1"].drained(), timeout=10)
    c = serving.rollouts.get("cancer")
    assert c.tick(c.step_started + 1) == "rollback"
    assert c.status == "rolled_back" and c.weight == 0.0
    alerts = [a.to_json() for a in serving.alerts.recent()]
    assert (
        alerts[-1]["kind"] == "canary_rollback"
        and "agreement with v1 0.0000 < min_agreement 0.9" in alerts[-1]["message"]
    )
    assert set(await send(client, cancer_rows, 50, offset=200)) == {"v1"}


async def test_failing_canary_falls_back_and_rolls_back(
    start: Any, write_config: Any, repo: Path, cancer_rows: Any, caplog: pytest.LogCaptureFixture
) -> None:
    build_broken(repo)
    extra = "gates = { max_error_rate = 0.05, min_requests = 20 }\n"
    client, serving = await start(
        write_config(canary(repo, "broken", weights="v1 = 50, broken = 50", extra=extra))
    )
    with caplog.at_level(logging.ERROR, logger="mlproxy"):
        answered = await send(client, cancer_rows, 100)  # every one 200: the broken ones fell back
    assert set(answered) == {"v1"}
    broken = serving.plan.models["cancer"].stats["broken"]
    assert broken.requests >= 20 and broken.errors == broken.requests
    assert serving.counters.fallbacks_of(VersionKey("cancer", "broken")) == broken.errors
    c = serving.rollouts.get("cancer")
    assert c.tick(c.step_started + 1) == "rollback"
    assert (
        "error rate 1.0000 > max_error_rate 0.05"
        in [a.to_json() for a in serving.alerts.recent()][-1]["message"]
    )


async def test_remote_canary_5xx_falls_back(
    start: Any, write_config: Any, model_repo: Path, aiohttp_raw_server: Any, cancer_rows: Any
) -> None:
    _, upstream = await start(write_config(model_section(repo=model_repo)))
    plane = create_data_plane(upstream)

    async def failing(request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "POST":
            return web.json_response({"error": "model server exploded"}, status=500)
        return await plane.handle(request)  # metadata still answers

    server = await aiohttp_raw_server(failing)
    versions = {
        "v1": f'{{ path = "{model_repo}/cancer/v1" }}',
        "v3": f'{{ url = "http://127.0.0.1:{server.port}/v2/models/cancer" }}',
    }
    section = model_section(mode="canary", repo=model_repo, versions=versions)
    client, serving = await start(
        write_config(section + "[models.cancer.canary]\nweights = { v1 = 1, v3 = 1 }\n")
    )
    answered = await send(client, cancer_rows, 40)
    assert set(answered) == {"v1"}
    assert serving.plan.models["cancer"].stats["v3"].errors > 0


async def test_rollback_survives_a_restart_until_the_canary_is_edited(
    write_config: Any, repo: Path, aiohttp_client: Any
) -> None:
    text = canary(
        repo, "v2", weights="v1 = 90, v2 = 10", extra="gates = { max_error_rate = 0.01 }\n"
    )
    config = write_config(text)
    serving = await create_serving(config)
    try:
        serving.rollouts.get("cancer").rollback(cause="test")
    finally:
        await close_serving(serving)
    serving = await create_serving(config)  # a restart
    try:
        c = serving.rollouts.get("cancer")
        assert c.status == "rolled_back" and c.weight == 0.0 and c.cause.startswith("restored")
        assert serving.plan.models["cancer"].strategy.split() == {"v1": 1.0, "v2": 0.0}
    finally:
        await close_serving(serving)
    edited = write_config(text.replace("v1 = 90, v2 = 10", "v1 = 80, v2 = 20"))
    serving = await create_serving(edited)  # a new rollout: the old decision no longer applies
    try:
        c = serving.rollouts.get("cancer")
        assert c.status == "holding" and c.weight == 20.0
        assert serving.state.get("cancer") is None
    finally:
        await close_serving(serving)


async def test_admin_api_needs_the_token_when_set(
    start: Any,
    write_config: Any,
    repo: Path,
    aiohttp_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("MLPROXY_ADMIN_TOKEN", "s3cret-token")
    _, serving = await start(
        write_config(
            canary(
                repo, "v2", weights="v1 = 90, v2 = 10", extra="gates = { max_error_rate = 0.5 }\n"
            )
        )
    )
    admin = await aiohttp_client(create_admin_app(serving))
    with caplog.at_level(logging.WARNING, logger="mlproxy.admin"):
        resp = await admin.post("/admin/models/cancer/promote")
        assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
        resp = await admin.post(
            "/admin/models/cancer/promote", headers={"Authorization": "Bearer wrong"}
        )
        assert resp.status == 401
    assert "s3cret-token" not in caplog.text and "wrong" in caplog.text
    assert serving.rollouts.get("cancer").weight == 10.0  # nothing happened
    auth = {"Authorization": "Bearer s3cret-token"}
    resp = await admin.post("/admin/models/cancer/promote", headers=auth)
    assert resp.status == 200 and (await resp.json())["status"] == "promoted"
    resp = await admin.post("/admin/models/cancer/rollback", headers=auth)
    assert (await resp.json())["weight"] == 0.0
    resp = await admin.post("/admin/reload", headers=auth)
    assert resp.status == 200 and (await resp.json())["outcome"] == "ok"
    status = await (await admin.get("/admin/status")).json()  # reading needs no token
    assert status["models"]["cancer"]["rollout"]["status"] == "rolled_back"
    alerts = await (await admin.get("/admin/alerts")).json()
    assert alerts["alerts"][-1]["kind"] == "canary_rollback"
    resp = await admin.post("/admin/models/nope/promote", headers=auth)
    assert resp.status == 404


async def test_without_token_mutations_need_a_loopback_admin(
    start: Any,
    write_config: Any,
    model_repo: Path,
    aiohttp_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MLPROXY_ADMIN_TOKEN", raising=False)
    config = write_config('[admin]\nhost = "0.0.0.0"\nport = 0\n' + model_section(repo=model_repo))
    _, serving = await start(config)
    admin = await aiohttp_client(create_admin_app(serving))
    resp = await admin.post("/admin/reload")
    assert resp.status == 403 and "not set" in (await resp.json())["error"]
    resp = await admin.post("/admin/models/cancer/promote")
    assert resp.status == 403
    assert (await admin.get("/admin/status")).status == 200


async def test_the_guard_follows_the_admin_table_the_plane_started_with(
    start: Any,
    write_config: Any,
    model_repo: Path,
    aiohttp_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # [admin] edits take effect at the next restart: a reload that moves the host off loopback
    # (or names another token variable) must not change who may mutate the running plane.
    monkeypatch.delenv("MLPROXY_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("MLPROXY_OTHER_TOKEN", "other")
    _, serving = await start(write_config(model_section(repo=model_repo)))
    admin = await aiohttp_client(create_admin_app(serving))
    write_config(
        '[admin]\nhost = "0.0.0.0"\nport = 0\ntoken_env = "MLPROXY_OTHER_TOKEN"\n'
        + model_section(repo=model_repo)
    )
    resp = await admin.post("/admin/reload")
    assert resp.status == 200 and (await resp.json())["outcome"] == "ok"
    assert serving.config.admin.host == "0.0.0.0"  # in force for the next start
    resp = await admin.post("/admin/reload")  # still loopback, still no token needed
    assert resp.status == 200, await resp.text()


async def test_promote_without_a_canary_is_a_conflict(
    start: Any, write_config: Any, model_repo: Path, aiohttp_client: Any
) -> None:
    _, serving = await start(write_config(model_section(repo=model_repo)))
    admin = await aiohttp_client(create_admin_app(serving))
    resp = await admin.post("/admin/models/cancer/promote")
    assert resp.status == 409 and "no canary rollout" in (await resp.json())["error"]


async def test_unwritable_state_and_audit_do_not_stop_serving_or_rollbacks(
    start: Any, write_config: Any, repo: Path, cancer_rows: Any, tmp_path: Path
) -> None:
    # The config's directory is read-only in a ConfigMap mount; as root here, make the two paths
    # directories instead, which no write can replace.
    (tmp_path / "config.state.json").mkdir()
    (tmp_path / "config.audit.jsonl").mkdir()
    extra = "gates = { max_error_rate = 0.5 }\n"
    client, serving = await start(
        write_config(canary(repo, "v2", weights="v1 = 50, v2 = 50", extra=extra))
    )
    serving.rollouts.get("cancer").rollback(cause="test")
    assert serving.plan.models["cancer"].strategy.split() == {"v1": 1.0, "v2": 0.0}
    serving.writer.wait_written()
    assert serving.state.write_errors == 1 and serving.audit.write_errors >= 2  # start, rollback
    assert set(await send(client, cancer_rows, 20)) == {"v1"}
    assert (await serving.reloader.reload("test"))["outcome"] == "ok"


async def test_drift_gate_rolls_back_a_canary_whose_inputs_drift(
    start: Any, write_config: Any, repo: Path, cancer_rows: Any
) -> None:
    extra = "gates = { max_psi = 0.25, min_requests = 20 }\n[models.cancer.drift]\nwindow = 100\nlong_window = 1000\n"
    client, serving = await start(
        write_config(canary(repo, "v2", weights="v1 = 50, v2 = 50", extra=extra))
    )
    c = serving.rollouts.get("cancer")
    await send(client, cancer_rows, 60)
    assert c.tick(c.step_started + 1) == "wait"  # the canary's drift window is not full yet
    shifted = cancer_rows.copy()
    shifted[:, 3] += cancer_rows[:, 3].std()  # mean_area moves by one standard deviation
    await send(client, shifted, 400, offset=60)
    assert c.tick(c.step_started + 1) == "rollback"
    assert "drift of mean_area: PSI" in c.cause and "> max_psi 0.25" in c.cause


async def test_drift_gate_needs_monitoring(write_config: Any, repo: Path) -> None:
    from proxy.errors import ConfigError

    extra = "gates = { max_psi = 0.25 }\n[models.cancer.drift]\nenabled = false\n"
    with pytest.raises(ConfigError, match="max_psi: needs drift monitoring"):
        await create_serving(
            write_config(canary(repo, "v2", weights="v1 = 50, v2 = 50", extra=extra))
        )
