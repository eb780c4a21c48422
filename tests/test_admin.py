"""Admin plane: /admin/status and /metrics reflect real traffic."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from proxy.http.admin import create_admin_app
from proxy.runtime.serving import close_serving, create_serving

from .helpers import infer_body, model_section
from .upstream import start_upstream


async def test_status_and_metrics_after_shadow_traffic(
    start: Any, write_config: Any, model_repo: Path, aiohttp_client: Any, cancer_rows: Any
) -> None:
    extra = '[models.cancer.shadow]\nprimary = "v1"\nmirrors = ["v2"]\n'
    client, serving = await start(
        write_config(model_section(mode="shadow", repo=model_repo) + extra)
    )
    for i in range(40):
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[i : i + 1]))
        assert resp.status == 200
    await client.post(
        "/v2/models/cancer/infer", data=b"junk"
    )  # a client error: not a version error
    await asyncio.wait_for(serving.plan.models["cancer"].lanes["v2"].drained(), timeout=10)
    admin = await aiohttp_client(create_admin_app(serving))

    status = await (await admin.get("/admin/status")).json()
    assert len(status["config"]["digest"]) == 64
    model = status["models"]["cancer"]
    assert model["mode"] == "shadow" and model["mirrors"] == ["v2"]
    v1, v2 = model["versions"]["v1"], model["versions"]["v2"]
    assert v1["requests"] == 40 and v1["errors"] == 0
    assert v1["p50_ms"] > 0 and v1["p99_ms"] >= v1["p50_ms"]
    assert v2["mirror"]["sent"] == 40 and v2["mirror"]["compared"] == 40
    assert 0.8 <= v2["mirror"]["agreement"] <= 1.0

    resp = await admin.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert (
        samples[
            ("mlproxy_requests_total", (("model", "cancer"), ("outcome", "ok"), ("version", "v1")))
        ]
        == 40
    )
    assert (
        samples[
            ("mlproxy_request_duration_seconds_count", (("model", "cancer"), ("version", "v1")))
        ]
        == 40
    )
    assert (
        samples[
            (
                "mlproxy_mirror_rows_total",
                (("model", "cancer"), ("outcome", "compared"), ("version", "v2")),
            )
        ]
        == 40
    )
    assert ("mlproxy_shadow_agreement_ratio", (("model", "cancer"), ("version", "v2"))) in samples
    assert (
        samples[("mlproxy_traffic_weight_ratio", (("model", "cancer"), ("version", "v1")))] == 1.0
    )


async def test_overload_is_503_with_retry_after(
    start: Any, write_config: Any, model_repo: Path, aiohttp_raw_server: Any, cancer_rows: Any
) -> None:
    upstream_serving = await create_serving(write_config(model_section(repo=model_repo)))
    try:
        up, _, url = await start_upstream(aiohttp_raw_server, upstream_serving)
        versions = {
            "v1": f'{{ path = "{model_repo}/cancer/v1" }}',
            "v3": f'{{ url = "{url}", timeout_ms = 30000 }}',
        }
        client, serving = await start(
            write_config(model_section(repo=model_repo, versions=versions), max_inflight=1)
        )
        up.gate.clear()
        held = asyncio.ensure_future(
            client.post("/v2/models/cancer/versions/v3/infer", json=infer_body(cancer_rows[:1]))
        )
        await asyncio.wait_for(up.first_received.wait(), timeout=10)  # the one slot is taken
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[:1]))
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        # the one slot is busy: it waits on its connection and is shed at its deadline
        assert "waited limits.queue_timeout_ms" in (await resp.json())["error"]
        up.gate.set()
        assert (await asyncio.wait_for(held, timeout=10)).status == 200
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[:1]))
        assert resp.status == 200 and serving.counters.shed_total == 1
    finally:
        await close_serving(upstream_serving)
