"""Remote versions (a second mlproxy as upstream) and blue-green over real HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy.errors import ConfigError
from proxy.serving import create_serving

from .conftest import infer_body, model_section, reference


def remote_config(model_repo: Path, url: str, timeout_ms: int = 2000) -> str:
    return model_section(
        repo=model_repo,
        versions={
            "v1": f'{{ path = "{model_repo}/cancer/v1" }}',
            "v3": f'{{ url = "{url}", timeout_ms = {timeout_ms} }}',
        },
    )


async def test_remote_version_answers_like_the_local_one(
    start: Any, write_config: Any, model_repo: Path, gated_upstream: Any, cancer_rows: Any
) -> None:
    up, _, url = gated_upstream
    client, _ = await start(write_config(remote_config(model_repo, url)))
    rows = cancer_rows[100:140]
    resp = await client.post("/v2/models/cancer/versions/v3/infer", json=infer_body(rows, rid="r1"))
    assert resp.status == 200 and resp.headers["x-model-version"] == "v3"
    remote = await resp.json()
    assert remote["id"] == "r1" and remote["model_version"] == "v3"
    want = reference(model_repo, "v2", rows)
    out = {o["name"]: o for o in remote["outputs"]}
    assert out["label"]["data"] == want["label"].tolist()
    np.testing.assert_allclose(
        np.array(out["probabilities"]["data"]).reshape(40, 2), want["probabilities"], rtol=1e-6
    )
    # the upstream serves v2: its answers are v2's, relayed unchanged
    assert up.answered == 1
    meta = await (await client.get("/v2/models/cancer/versions/v3")).json()
    assert meta["parameters"]["url"] == url


async def test_remote_timeout_is_504_and_dead_upstream_is_502(
    start: Any, write_config: Any, model_repo: Path, gated_upstream: Any, cancer_rows: Any
) -> None:
    up, server, url = gated_upstream
    client, _ = await start(write_config(remote_config(model_repo, url, timeout_ms=100)))
    up.gate.clear()
    resp = await client.post(
        "/v2/models/cancer/versions/v3/infer", json=infer_body(cancer_rows[:1])
    )
    assert resp.status == 504
    assert "did not answer within 100 ms" in (await resp.json())["error"]
    up.gate.set()
    await server.close()
    resp = await client.post(
        "/v2/models/cancer/versions/v3/infer", json=infer_body(cancer_rows[:1])
    )
    assert resp.status == 502
    assert "version v3 at http://127.0.0.1" in (await resp.json())["error"]
    resp = await client.post(
        "/v2/models/cancer/versions/v1/infer", json=infer_body(cancer_rows[:1])
    )
    assert resp.status == 200  # nothing else broke


async def test_remote_that_does_not_answer_metadata_is_refused(
    write_config: Any, model_repo: Path, unused_tcp_port: int
) -> None:
    config = write_config(
        remote_config(model_repo, f"http://127.0.0.1:{unused_tcp_port}/v2/models/cancer")
    )
    with pytest.raises(ConfigError) as err:
        await create_serving(config)
    assert "models.cancer.versions.v3:" in str(err.value) and "metadata call failed" in str(
        err.value
    )


@pytest.mark.parametrize(("active", "want"), [("blue", "v1"), ("green", "v2")])
async def test_blue_green_serves_only_active(
    start: Any, write_config: Any, model_repo: Path, cancer_rows: Any, active: str, want: str
) -> None:
    extra = f'[models.cancer.blue_green]\nblue = "v1"\ngreen = "v2"\nactive = "{active}"\n'
    client, serving = await start(
        write_config(model_section(mode="blue_green", repo=model_repo) + extra)
    )
    for i in range(200):
        resp = await client.post(
            "/v2/models/cancer/infer",
            json=infer_body(cancer_rows[i : i + 1]),
            headers={"x-user-id": f"u{i}"},
        )
        assert resp.headers["x-model-version"] == want
    # the standby is loaded and warm: pinned requests to it are served
    other = "v2" if want == "v1" else "v1"
    resp = await client.post(
        f"/v2/models/cancer/versions/{other}/infer", json=infer_body(cancer_rows[:1])
    )
    assert resp.status == 200
    assert serving.plan.models["cancer"].stats[want].requests == 200
