"""Remote versions (a second mlproxy as upstream) and blue-green over real HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy.errors import ConfigError
from proxy.runtime.serving import close_serving, create_serving

from .helpers import infer_body, model_section, reference


def remote_config(model_repo: Path, url: str, timeout_ms: int = 2000) -> str:
    return model_section(
        repo=model_repo,
        versions={
            "v1": f'{{ path = "{model_repo}/cancer/v1" }}',
            "v3": f'{{ url = "{url}", timeout_ms = {timeout_ms} }}',
        },
    )


def watched_remote(model_repo: Path, url: str, baseline: Path | str) -> str:
    """v3 (stable): the remote upstream, watched on `baseline`."""
    return model_section(
        repo=model_repo,
        stable="v3",
        versions={"v3": f'{{ url = "{url}", baseline = "{baseline}" }}'},
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


async def test_remote_that_does_not_answer_metadata_is_loaded_unavailable(
    write_config: Any, model_repo: Path, unused_tcp_port: int
) -> None:
    """Upstream health is not a config error: the config loads, the version is unavailable
    (tests/test_upstream_health.py covers what it then serves and how it comes back)."""
    config = write_config(
        remote_config(model_repo, f"http://127.0.0.1:{unused_tcp_port}/v2/models/cancer")
    )
    serving = await create_serving(config)
    try:
        assert not serving.plan.models["cancer"].backends["v3"].available
    finally:
        await close_serving(serving)


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


async def test_remote_version_with_a_baseline_is_watched_for_drift(
    start: Any,
    write_config: Any,
    model_repo: Path,
    gated_upstream: Any,
    cancer_rows: Any,
    tmp_path: Path,
) -> None:
    """`baseline = <manifest.json>` on a url version: its answers are binned and judged like a
    local version's; a shifted feature raises a drift alert naming it."""
    _up, _, url = gated_upstream
    section = watched_remote(model_repo, url, model_repo / "cancer" / "v2" / "manifest.json")
    client, serving = await start(
        write_config(section + "[models.cancer.drift]\nwindow = 200\nlong_window = 1000\n")
    )
    rng = np.random.default_rng(3)
    for _ in range(20):
        rows = cancer_rows[rng.integers(0, len(cancer_rows), 10)]
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(rows))
        assert resp.status == 200 and resp.headers["x-model-version"] == "v3"
    serving.scheduler.housekeeping()
    vw = serving.watch.versions[("cancer", "v3")]
    assert vw.monitor is not None and vw.monitor.judged["short"].psi.max() < 0.25
    assert vw.holdout_accuracy is not None  # from the baseline manifest's metrics
    shifted = cancer_rows[:200].copy()
    shifted[:, 3] += 2 * cancer_rows[:, 3].std()  # mean_area, 2 sd up
    for i in range(0, 200, 10):
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(shifted[i : i + 10]))
        assert resp.status == 200
    serving.scheduler.housekeeping()
    drift = [
        a
        for a in [a.to_json() for a in serving.alerts.recent()]
        if a["kind"] == "drift" and a["version"] == "v3"
    ]
    assert any(a.get("feature") == "mean_area" and a["state"] == "firing" for a in drift), drift


async def test_bad_remote_baselines_are_refused(
    write_config: Any, model_repo: Path, gated_upstream: Any, tmp_path: Path
) -> None:
    _up, _, url = gated_upstream
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    no_baseline = tmp_path / "none.json"
    no_baseline.write_text('{"name": "x"}')
    wrong = tmp_path / "wrong.json"
    wrong.write_text(
        '{"baseline": {"features": [{"name": "a", "edges": [0, 1], "fractions": [1]}]}}'
    )
    for path, why in (
        (tmp_path / "missing.json", "cannot read"),
        (bad_json, "not JSON"),
        (no_baseline, "no baseline.features"),
        (wrong, "1 features, the remote model takes 30"),
    ):
        section = watched_remote(model_repo, url, path)
        with pytest.raises(ConfigError) as err:
            await create_serving(write_config(section))
        assert str(path) in str(err.value) and why in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match="is for url versions"):
        write_config(
            model_section(
                repo=model_repo,
                versions={
                    "v1": f'{{ path = "{model_repo}/cancer/v1", baseline = "{bad_json}" }}',
                    "v2": f'{{ path = "{model_repo}/cancer/v2" }}',
                },
            )
        )


async def test_a_changed_remote_baseline_reloads_the_version(
    start: Any, write_config: Any, model_repo: Path, gated_upstream: Any, tmp_path: Path
) -> None:
    _up, _, url = gated_upstream
    baseline = tmp_path / "baseline.json"
    baseline.write_bytes((model_repo / "cancer" / "v2" / "manifest.json").read_bytes())
    section = watched_remote(model_repo, url, baseline)
    _client, serving = await start(write_config(section))
    before = serving.plan.models["cancer"].backends["v3"]
    done = await serving.reloader.reload("test")
    assert done["outcome"] == "ok" and done["versions_loaded"] == 0  # same file: kept warm
    baseline.write_bytes((model_repo / "cancer" / "v1" / "manifest.json").read_bytes())
    done = await serving.reloader.reload("test")
    assert done["outcome"] == "ok" and done["versions_loaded"] == 1
    after = serving.plan.models["cancer"].backends["v3"]
    assert after is not before and after.manifest is not None and after.manifest.version == "v1"


async def test_a_max_psi_gate_takes_a_remote_canary_only_with_a_baseline(
    start: Any, write_config: Any, model_repo: Path, gated_upstream: Any, cancer_rows: Any
) -> None:
    """A remote canary watched on a baseline manifest is judged for drift like a local one, so
    its max_psi gate works; without a baseline there is nothing to judge and the config is
    refused at load, naming the key."""
    _, _, url = gated_upstream
    canary = (
        "[models.cancer.canary]\nweights = { v1 = 50, v3 = 50 }\n"
        "gates = { max_psi = 0.25, min_requests = 10 }\n"
        "[models.cancer.drift]\nwindow = 100\nlong_window = 1000\n"
    )
    baseline = model_repo / "cancer" / "v2" / "manifest.json"
    watched = {
        "v1": f'{{ path = "{model_repo}/cancer/v1" }}',
        "v3": f'{{ url = "{url}", baseline = "{baseline}" }}',
    }
    client, serving = await start(
        write_config(model_section(mode="canary", repo=model_repo, versions=watched) + canary)
    )
    c = serving.rollouts.get("cancer")
    assert c is not None
    shifted = cancer_rows.copy()
    shifted[:, 3] += cancer_rows[:, 3].std()  # mean_area moves by one standard deviation
    for i in range(0, 400, 4):
        resp = await client.post(
            "/v2/models/cancer/infer",
            json=infer_body(shifted[i : i + 4]),
            headers={"x-user-id": str(i)},
        )
        assert resp.status == 200
    serving.scheduler.housekeeping()
    assert c.tick(c.step_started + 1) == "rollback"
    assert "drift of mean_area" in c.cause

    unwatched = {**watched, "v3": f'{{ url = "{url}" }}'}
    with pytest.raises(ConfigError, match=r"canary\.gates\.max_psi: v3 has no baseline"):
        await create_serving(
            write_config(
                model_section(mode="canary", repo=model_repo, versions=unwatched) + canary,
                name="unwatched.toml",
            )
        )
