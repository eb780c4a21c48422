"""Fallback accounting: the version that failed records its failure (and its own time to
fail), the version that answered records the request it answered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxy.config.schema import VersionKey

from .badmodels import build_broken
from .helpers import infer_body, model_section


def _canary(repo: Path) -> str:
    versions = {
        "v1": f'{{ path = "{repo}/cancer/v1" }}',
        "broken": f'{{ path = "{repo}/cancer/broken" }}',
    }
    return model_section(mode="canary", repo=repo, versions=versions) + (
        "[models.cancer.canary]\nweights = { v1 = 50, broken = 50 }\n"
    )


async def test_each_version_records_its_own_part_of_a_fallback(
    start: Any, write_config: Any, repo: Path, cancer_rows: Any
) -> None:
    build_broken(repo)
    client, serving = await start(write_config(_canary(repo)))
    answered = []
    for i in range(60):
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[i : i + 1]))
        assert resp.status == 200, await resp.text()
        answered.append(resp.headers["x-model-version"])
    assert set(answered) == {"v1"}  # every request the broken canary got fell back

    stats = serving.plan.models["cancer"].stats
    v1, broken = stats["v1"], stats["broken"]
    fallbacks = serving.counters.fallbacks_of(VersionKey("cancer", "broken"))
    # binomial(60, 1/2): more than 10 each way with probability > 1 - 1e-5 (seeded rng anyway)
    assert broken.requests > 10 and v1.requests - fallbacks > 10
    assert broken.errors == broken.requests == fallbacks
    # v1 answered all 60: the 60 it was routed and the fallbacks; each is on its histogram
    assert v1.requests == 60 and v1.errors == 0
    assert v1.latency.count == 60
    # the broken version's histogram holds its failures only, one per failed request
    assert broken.latency.count == broken.errors
    assert broken.rows == broken.requests and v1.rows == 60


async def test_a_failed_fallback_is_an_error_of_the_stable_version(
    start: Any, write_config: Any, repo: Path, cancer_rows: Any
) -> None:
    build_broken(repo, "broken")
    build_broken(repo, "v1")  # stable is broken too: the fallback fails
    client, serving = await start(write_config(_canary(repo)))
    for i in range(20):
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[i : i + 1]))
        assert resp.status == 502
    stats = serving.plan.models["cancer"].stats
    v1, broken = stats["v1"], stats["broken"]
    assert v1.requests == 20  # every request reached v1: routed there, or falling back
    assert v1.errors == v1.requests == v1.latency.count
    assert broken.errors == broken.requests == broken.latency.count


async def test_a_pinned_request_does_not_fall_back(
    start: Any, write_config: Any, repo: Path, cancer_rows: Any
) -> None:
    build_broken(repo)
    client, serving = await start(write_config(_canary(repo)))
    resp = await client.post(
        "/v2/models/cancer/versions/broken/infer", json=infer_body(cancer_rows[:1])
    )
    assert resp.status == 502
    broken = serving.plan.models["cancer"].stats["broken"]
    assert broken.errors == broken.requests == broken.latency.count == 1
    assert serving.counters.fallbacks_of(VersionKey("cancer", "broken")) == 0
