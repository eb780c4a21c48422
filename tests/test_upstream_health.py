"""Upstream health is not a config error: a remote version that does not answer is loaded
unavailable and probed; its breaker ejects a failing or hung upstream after a bounded number of
calls; retries are budgeted. Real upstreams on 127.0.0.1 throughout (tests/upstream.py)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config.schema import VersionConfig, VersionKey
from proxy.engine.breaker import Breaker, BreakerState, RetryBudget
from proxy.errors import ConfigError, UpstreamError, UpstreamTimeoutError
from proxy.http.admin import create_admin_app
from proxy.models.backends import RemoteBackend
from proxy.models.remote import (
    BREAKER_FAILURES,
    BREAKER_PAUSE_S,
    RETRY_CAP,
    RETRY_RATIO,
    UpstreamUnavailableError,
)
from proxy.runtime.serving import Serving, close_serving, create_serving

from .helpers import infer_body, model_section, until
from .upstream import GatedUpstream, down_url, start_metadata_only, start_upstream


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ the breaker and the budget


def test_breaker_opens_after_failures_in_a_row_and_one_trial_decides() -> None:
    clock = Clock()
    b = Breaker(failures=3, pause_s=10.0, clock=clock)
    for _ in range(2):
        assert b.allow() and not b.failure()
    assert b.allow()
    b.success()  # a success in between: the count starts again
    assert [b.allow() and b.failure() for _ in range(3)] == [False, False, True]
    assert b.state() is BreakerState.OPEN and b.opened_total == 1
    assert not b.allow() and b.retry_in() == 10.0
    assert not b.failure()  # a call let through before it opened: no verdict, no new pause
    b.success()
    assert b.state() is BreakerState.OPEN
    clock.now += 10.0
    assert b.state() is BreakerState.HALF_OPEN
    assert b.allow()  # the one trial
    assert not b.allow()  # ... and only one at a time
    assert b.failure()  # the trial failed: open for another pause
    assert b.state() is BreakerState.OPEN and b.opened_total == 2
    clock.now += 10.0
    assert b.allow()
    b.release()  # the trial was cancelled: another may go
    assert b.allow()
    b.success()
    assert b.state() is BreakerState.CLOSED and b.failures_in_a_row == 0 and b.allow()


def test_breaker_can_start_open() -> None:
    clock = Clock()
    b = Breaker(failures=5, pause_s=2.0, clock=clock, opened=True)
    assert b.is_open() and not b.allow() and b.opened_total == 1
    clock.now += 2.0
    assert not b.is_open() and b.allow()


def test_retry_budget_is_a_ratio_of_calls_plus_a_floor() -> None:
    """Every call fails for 100 s at 100 calls a second: retries stay within ratio x calls +
    floor x seconds + the bank, instead of doubling the load."""
    clock = Clock()
    budget = RetryBudget(ratio=0.1, floor_per_s=1.0, cap=10.0, clock=clock)
    calls = 0
    for _ in range(100):
        for _ in range(100):
            budget.called()
            calls += 1
            budget.try_retry()
        clock.now += 1.0
    assert budget.retried + budget.denied == calls
    assert budget.retried <= 0.1 * calls + 1.0 * 100 + 10
    assert budget.retried >= 0.1 * calls  # what the ratio grants is granted
    idle = RetryBudget(ratio=0.1, floor_per_s=1.0, cap=10.0, clock=clock)
    assert sum(idle.try_retry() for _ in range(50)) == 10  # the bank, then nothing
    clock.now += 3.0
    assert sum(idle.try_retry() for _ in range(50)) == 3  # the floor refills it


# ------------------------------------------------------------------ fixtures


@pytest.fixture
async def upstream_on(
    aiohttp_raw_server: Any, write_config: Any, model_repo: Path
) -> AsyncIterator[Callable[..., Any]]:
    """upstream_on(port=None) -> (gated upstream, server, url): a second mlproxy serving
    cancer v2, started when the test says (on the port the proxy already expects)."""
    servings: list[Serving] = []
    ups: list[GatedUpstream] = []

    async def _start(port: int | None = None) -> tuple[GatedUpstream, Any, str]:
        config = write_config(model_section(repo=model_repo, stable="v2"), name="upstream.toml")
        serving = await create_serving(config, rng=random.Random(0))
        servings.append(serving)
        up, server, url = await start_upstream(aiohttp_raw_server, serving, port=port)
        ups.append(up)
        return up, server, url

    yield _start
    for up in ups:
        up.gate.set()
    for s in servings:
        await close_serving(s)


def two_versions(
    model_repo: Path, url: str, *, mode: str, extra: str, timeout_ms: int = 1000
) -> str:
    versions = {
        "v1": f'{{ path = "{model_repo}/cancer/v1" }}',
        "v3": f'{{ url = "{url}", timeout_ms = {timeout_ms} }}',
    }
    return model_section(mode=mode, repo=model_repo, versions=versions) + extra


SHADOW = '[models.cancer.shadow]\nprimary = "v1"\nmirrors = ["v3"]\nbreaker_pause_s = {pause}\n'
CANARY = "[models.cancer.canary]\nweights = {{ v1 = {stable}, v3 = {canary} }}\n"
BLUE_GREEN = '[models.cancer.blue_green]\nblue = "v1"\ngreen = "v3"\nactive = "green"\n'


async def status_of(aiohttp_client: Any, serving: Serving) -> dict[str, Any]:
    admin = await aiohttp_client(create_admin_app(serving))
    resp = await admin.get("/admin/status")
    assert resp.status == 200
    doc: dict[str, Any] = await resp.json()
    return doc


# ------------------------------------------------------------------ unavailable at load


async def test_a_dead_mirror_does_not_take_the_primary_down_and_mirrors_once_it_answers(
    start: Any,
    write_config: Any,
    model_repo: Path,
    upstream_on: Any,
    aiohttp_client: Any,
    cancer_rows: Any,
) -> None:
    port, url = down_url()
    config = write_config(
        two_versions(model_repo, url, mode="shadow", extra=SHADOW.format(pause=0.05))
    )
    client, serving = await start(config)  # the mirror does not answer: no ConfigError
    doc = await status_of(aiohttp_client, serving)
    v3 = doc["models"]["cancer"]["versions"]["v3"]
    assert v3["available"] is False and v3["upstream"]["state"] == "unavailable"
    assert "metadata call failed" in v3["upstream"]["problem"]
    assert v3["mirror"]["breaker_opened"] == 1  # the lane starts paused: tried after its pause
    assert doc["models"]["cancer"]["ready"] is True
    assert (await client.get("/v2/models/cancer/ready")).status == 200
    assert (await client.get("/v2/models/cancer/versions/v3/ready")).status == 503
    for i in range(20):
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[i : i + 1]))
        assert resp.status == 200 and resp.headers["x-model-version"] == "v1"
    assert serving.plan.models["cancer"].stats["v3"].mirror.compared == 0

    up, _, _ = await upstream_on(port)  # the mirror's server comes up where it was expected
    backend = serving.plan.models["cancer"].backends["v3"]
    assert await backend.probe()  # the probe's step: its metadata answers and fits
    assert backend.available and up.metadata_calls >= 1
    assert (await client.get("/v2/models/cancer/versions/v3/ready")).status == 200
    lane = serving.plan.models["cancer"].lanes["v3"]
    mirror = serving.plan.models["cancer"].stats["v3"].mirror

    async def mirrored() -> bool:  # the lane's next trial batch (after its 0.05 s pause) goes
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[:1]))
        assert resp.status == 200 and resp.headers["x-model-version"] == "v1"
        await asyncio.wait_for(lane.drained(), timeout=10)
        return mirror.compared > 0

    await until(mirrored, "the mirror compares answers once its upstream is up")
    assert up.received >= 1 and not lane.breaker_open
    doc = await status_of(aiohttp_client, serving)
    assert doc["models"]["cancer"]["versions"]["v3"]["upstream"]["state"] == "closed"


@pytest.mark.parametrize("mode", ["canary", "blue_green"])
async def test_an_unavailable_canary_or_green_gets_no_traffic(
    start: Any,
    write_config: Any,
    model_repo: Path,
    aiohttp_client: Any,
    cancer_rows: Any,
    mode: str,
) -> None:
    """Its share falls back to stable at once (no upstream call is made), counted as the
    version's fallbacks and errors (a gated rollout sees a version that serves nothing)."""
    _, url = down_url()
    extra = CANARY.format(stable=50, canary=50) if mode == "canary" else BLUE_GREEN
    client, serving = await start(
        write_config(two_versions(model_repo, url, mode=mode, extra=extra))
    )
    for i in range(40):
        resp = await client.post(
            "/v2/models/cancer/infer",
            json=infer_body(cancer_rows[i : i + 1]),
            headers={"x-user-id": f"u{i}"},
        )
        assert resp.status == 200 and resp.headers["x-model-version"] == "v1"
    fallbacks = serving.counters.fallbacks_of(VersionKey("cancer", "v3"))
    stats = serving.plan.models["cancer"].stats
    # canary: binomial(40, 1/2), more than 5 each way with probability > 1 - 1e-6; green: all 40
    assert fallbacks > 5 if mode == "canary" else fallbacks == 40
    assert stats["v3"].errors == stats["v3"].requests == fallbacks
    doc = await status_of(aiohttp_client, serving)
    model = doc["models"]["cancer"]
    assert model["ready"] is True
    v3 = model["versions"]["v3"]
    assert v3["fallbacks"] == fallbacks and v3["available"] is False
    assert v3["upstream"]["ejected"] == fallbacks  # refused at once: the upstream never called
    metrics = await (await (await aiohttp_client(create_admin_app(serving))).get("/metrics")).text()
    assert f'mlproxy_fallbacks_total{{model="cancer",version="v3"}} {float(fallbacks)}' in metrics
    assert 'mlproxy_version_available{model="cancer",version="v3"} 0.0' in metrics
    assert 'mlproxy_version_available{model="cancer",version="v1"} 1.0' in metrics
    refused = (
        f'mlproxy_upstream_refused_calls_total{{model="cancer",version="v3"}} {float(fallbacks)}'
    )
    assert refused in metrics
    # a pinned request is not moved: 503 with Retry-After, saying why
    resp = await client.post(
        "/v2/models/cancer/versions/v3/infer", json=infer_body(cancer_rows[:1])
    )
    assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
    assert "is unavailable (metadata call failed" in (await resp.json())["error"]


async def test_only_a_sole_remote_makes_its_model_not_ready(
    start: Any,
    write_config: Any,
    model_repo: Path,
    upstream_on: Any,
    aiohttp_client: Any,
    cancer_rows: Any,
) -> None:
    """`cancer` is served by one remote version that is down; `local` by a local one. Only
    `cancer` is not ready (503, as tritonclient's is_model_ready and Kubernetes probes read a
    status, and {"ready": false}); the server itself stays ready; infer is 503 + Retry-After."""
    port, url = down_url()
    sections = model_section(
        repo=model_repo, stable="v3", versions={"v3": f'{{ url = "{url}" }}'}
    ) + model_section(repo=model_repo, name="local")
    client, serving = await start(write_config(sections))
    resp = await client.get("/v2/models/cancer/ready")
    assert resp.status == 503 and await resp.json() == {"name": "cancer", "ready": False}
    assert (await client.get("/v2/models/local/ready")).status == 200
    assert (await client.get("/v2/health/ready")).status == 200
    resp = await client.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[:1]))
    assert resp.status == 503 and "Retry-After" in resp.headers
    assert (await client.get("/v2/models/cancer")).status == 503  # no metadata to show yet
    resp = await client.post("/v2/models/local/infer", json=infer_body(cancer_rows[:1]))
    assert resp.status == 200
    doc = await status_of(aiohttp_client, serving)
    assert doc["models"]["cancer"]["ready"] is False and doc["models"]["local"]["ready"] is True

    await upstream_on(port)
    assert await serving.plan.models["cancer"].backends["v3"].probe()
    resp = await client.get("/v2/models/cancer/ready")
    assert resp.status == 200 and (await resp.json())["ready"] is True
    resp = await client.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[:3]))
    assert resp.status == 200 and resp.headers["x-model-version"] == "v3"


async def test_a_probe_that_finds_another_schema_keeps_the_version_unavailable(
    start: Any,
    write_config: Any,
    model_repo: Path,
    aiohttp_raw_server: Any,
    aiohttp_client: Any,
    cancer_rows: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    port, url = down_url()
    extra = CANARY.format(stable=50, canary=50)
    client, serving = await start(
        write_config(two_versions(model_repo, url, mode="canary", extra=extra))
    )
    five = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 5]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}],
    }
    wrong, _ = await start_metadata_only(aiohttp_raw_server, five, port=port)
    backend = serving.plan.models["cancer"].backends["v3"]
    with caplog.at_level(logging.ERROR, logger="mlproxy"):
        assert not await backend.probe()
        assert not await backend.probe()  # the same misfit is logged once
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "all versions of a model must take the same input" in errors[0]
    doc = await status_of(aiohttp_client, serving)
    v3 = doc["models"]["cancer"]["versions"]["v3"]
    assert v3["available"] is False and "metadata does not fit" in v3["upstream"]["problem"]
    for i in range(20):
        resp = await client.post(
            "/v2/models/cancer/infer",
            json=infer_body(cancer_rows[i : i + 1]),
            headers={"x-user-id": str(i)},
        )
        assert resp.status == 200 and resp.headers["x-model-version"] == "v1"
    assert wrong.infer_calls == 0


async def test_metadata_that_answers_wrong_at_load_is_still_a_config_error(
    write_config: Any, model_repo: Path, aiohttp_raw_server: Any
) -> None:
    not_oip, url = await start_metadata_only(aiohttp_raw_server, {"inputs": "x"})
    with pytest.raises(ConfigError, match="metadata is not Open Inference Protocol"):
        await create_serving(write_config(two_versions(model_repo, url, mode="single", extra="")))
    five = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 5]}], "outputs": []}
    _, url = await start_metadata_only(aiohttp_raw_server, five)
    with pytest.raises(ConfigError, match="all versions of a model must take the same input"):
        await create_serving(write_config(two_versions(model_repo, url, mode="single", extra="")))
    assert not_oip.infer_calls == 0


async def test_a_reload_adding_a_remote_that_does_not_answer_is_applied(
    start: Any, write_config: Any, model_repo: Path, aiohttp_client: Any, cancer_rows: Any
) -> None:
    client, serving = await start(write_config(model_section(repo=model_repo)))
    _, url = down_url()
    extra = CANARY.format(stable=50, canary=50)
    write_config(two_versions(model_repo, url, mode="canary", extra=extra))  # the same file
    result = await serving.reloader.reload("test")
    assert result["outcome"] == "ok", result
    assert serving.plan.models["cancer"].backends["v3"].available is False
    for i in range(10):
        resp = await client.post(
            "/v2/models/cancer/infer",
            json=infer_body(cancer_rows[i : i + 1]),
            headers={"x-user-id": str(i)},
        )
        assert resp.status == 200 and resp.headers["x-model-version"] == "v1"
    doc = await status_of(aiohttp_client, serving)
    assert doc["config"]["last_error"] is None
    assert doc["models"]["cancer"]["versions"]["v3"]["upstream"]["state"] == "unavailable"


# ------------------------------------------------------------------ the breaker on the primary path


async def test_a_hung_canary_costs_a_bounded_number_of_requests(
    start: Any,
    write_config: Any,
    model_repo: Path,
    upstream_on: Any,
    aiohttp_client: Any,
    cancer_rows: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every request goes to the remote canary, which hangs. The requests in flight when it
    hung and BREAKER_FAILURES in a row wait out the 100 ms timeout; then the breaker is open,
    no call reaches the hung server, and stable answers at once. One WARNING per ejection, and
    one (not one per request) for the fallbacks."""
    up, _, url = await upstream_on()
    extra = CANARY.format(stable=0, canary=100)
    client, serving = await start(
        write_config(two_versions(model_repo, url, mode="canary", extra=extra, timeout_ms=100))
    )
    resp = await client.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[:1]))
    assert resp.headers["x-model-version"] == "v3"  # the canary answers while it is healthy
    up.gate.clear()  # from now on it hangs
    in_flight = 8

    async def one(i: int) -> str:
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[i : i + 1]))
        assert resp.status == 200
        return resp.headers["x-model-version"]

    with caplog.at_level(logging.WARNING, logger="mlproxy"):
        answered = await asyncio.gather(*(one(i) for i in range(in_flight)))
        assert set(answered) == {"v1"} and up.received == 1 + in_flight
        for i in range(30):  # (well within the breaker's pause)
            assert await one(i) == "v1"
    assert up.received == 1 + in_flight  # none of the 30 reached the hung server
    backend = serving.plan.models["cancer"].backends["v3"]
    health = backend.health()
    assert health is not None and health.state == "open" and health.ejected == 30
    assert health.breaker_opened == 1
    ejections = [r for r in caplog.records if "ejected for" in r.getMessage()]
    fallback_lines = [r for r in caplog.records if "cancer/v3 failed" in r.getMessage()]
    assert len(ejections) == 1 and len(fallback_lines) == 1
    assert serving.counters.fallbacks_of(VersionKey("cancer", "v3")) == in_flight + 30
    doc = await status_of(aiohttp_client, serving)
    assert doc["models"]["cancer"]["versions"]["v3"]["upstream"]["state"] == "open"
    metrics = await (await (await aiohttp_client(create_admin_app(serving))).get("/metrics")).text()
    assert 'mlproxy_upstream_ejections_total{model="cancer",version="v3"} 1.0' in metrics
    assert 'mlproxy_upstream_refused_calls_total{model="cancer",version="v3"} 30.0' in metrics
    assert 'mlproxy_version_available{model="cancer",version="v3"} 0.0' in metrics


async def test_a_half_open_trial_closes_the_breaker(upstream_on: Any, cancer_rows: Any) -> None:
    """Driven with a clock the test moves: after the pause one call is the trial, the others
    are still refused while it runs; its success closes the breaker."""
    up, _, url = await upstream_on()
    clock = Clock()
    async with aiohttp.ClientSession() as http:
        config = VersionConfig(name="v3", url=url, timeout_ms=100.0)
        backend = await RemoteBackend.create(config, http, clock)
        try:
            rows = cancer_rows[:2]
            assert (await backend.infer(rows))["label"].shape == (2,)
            up.gate.clear()
            for _ in range(BREAKER_FAILURES):
                with pytest.raises(UpstreamTimeoutError, match="did not answer within 100 ms"):
                    await backend.infer(rows)
            with pytest.raises(UpstreamUnavailableError, match="ejected after 5 failed calls"):
                await backend.infer(rows)
            assert up.received == 1 + BREAKER_FAILURES and not backend.available
            clock.now += BREAKER_PAUSE_S
            trial = asyncio.ensure_future(backend.infer(rows))
            await until(lambda: up.received == 2 + BREAKER_FAILURES, "the trial arrives")
            with pytest.raises(UpstreamUnavailableError):
                await backend.infer(rows)  # one trial at a time
            up.gate.set()
            assert (await asyncio.wait_for(trial, 10))["label"].shape == (2,)
            assert backend.available and str(backend.breaker.state()) == "closed"
            assert (await backend.infer(rows))["label"].shape == (2,)
        finally:
            await backend.close()


async def test_retries_are_budgeted_under_an_upstream_that_refuses_connections(
    upstream_on: Any, cancer_rows: Any
) -> None:
    """200 calls at once to an upstream that went away: each may retry its failed connection
    (nothing was sent) only while the budget allows: the bank plus 10% of the calls."""
    _, server, url = await upstream_on()
    clock = Clock()  # frozen: no floor refill during the burst
    async with aiohttp.ClientSession() as http:
        backend = await RemoteBackend.create(VersionConfig(name="v3", url=url), http, clock)
        try:
            await server.close()
            n = 200
            results = await asyncio.gather(
                *(backend.infer(cancer_rows[:1]) for _ in range(n)), return_exceptions=True
            )
            assert all(isinstance(r, UpstreamError) for r in results)
            health = backend.health()
            assert health.retries + health.retries_denied == n  # every call wanted one retry
            assert 1 <= health.retries <= RETRY_CAP + RETRY_RATIO * n
            assert health.state == "open"  # and then the breaker stops the calls altogether
            with pytest.raises(UpstreamUnavailableError):
                await backend.infer(cancer_rows[:1])
        finally:
            await backend.close()
