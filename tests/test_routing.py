"""Routing: split fractions, stickiness, minimal movement (pure), and the split over real HTTP."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from proxy.routing.strategy import Strategy, stable_unit

from .helpers import infer_body, model_section


def canary(weights: dict[str, float]) -> Strategy:
    total = sum(weights.values())
    return Strategy(
        "canary", tuple(weights), tuple(w / total for w in weights.values()), salt="cancer"
    )


def test_stable_unit_is_fixed_across_runs() -> None:
    # Pinned: Python's hash() changes with PYTHONHASHSEED; this must not, or a restart (or
    # another worker) would move sticky users to other versions.
    assert stable_unit("cancer", "v1", "user-1") == stable_unit("cancer", "v1", "user-1")
    assert abs(stable_unit("cancer", "v1", "user-1") - 0.7611367688621897) < 1e-12
    assert 0.0 < stable_unit("") < 1.0


def test_random_split_within_three_sigma() -> None:
    s = canary({"v1": 90, "v2": 10})
    rng = random.Random(7)
    n = 20_000
    hits = sum(s.choose(None, rng.random()).primary == "v2" for _ in range(n))
    sigma = math.sqrt(n * 0.1 * 0.9)  # binomial
    assert abs(hits - n * 0.1) <= 3 * sigma


def test_sticky_split_within_three_sigma_and_zero_weight_never_chosen() -> None:
    s = canary({"v1": 3, "v2": 1, "v3": 0})
    n = 4000
    picks = [s.choose(f"user-{i}", 0.0).primary for i in range(n)]
    sigma = math.sqrt(n * 0.25 * 0.75)
    assert abs(picks.count("v2") - n * 0.25) <= 3 * sigma
    assert "v3" not in picks


def test_sticky_users_never_change_version() -> None:
    s = canary({"v1": 50, "v2": 50})
    rng = random.Random(1)
    first = {f"u{i}": s.choose(f"u{i}", rng.random()).primary for i in range(500)}
    for _ in range(5):
        for user, version in first.items():
            assert s.choose(user, rng.random()).primary == version


def test_moving_weights_moves_only_the_users_that_must_move() -> None:
    users = [f"user-{i}" for i in range(5000)]
    before = canary({"v1": 90, "v2": 10})
    after = canary({"v1": 75, "v2": 25})
    b = {u: before.choose(u, 0.0).primary for u in users}
    a = {u: after.choose(u, 0.0).primary for u in users}
    moved = [u for u in users if a[u] != b[u]]
    assert all(b[u] == "v1" and a[u] == "v2" for u in moved)  # nobody leaves the canary
    sigma = math.sqrt(len(users) * 0.15 * 0.85)
    assert abs(len(moved) - len(users) * 0.15) <= 3 * sigma  # about 15% move, no more
    # adding a third version takes users only into it
    three = canary({"v1": 75, "v2": 25, "v3": 20})
    c = {u: three.choose(u, 0.0).primary for u in users}
    assert all(c[u] in (a[u], "v3") for u in users)


def test_shadow_sample_decides_mirroring() -> None:
    s = Strategy("shadow", ("v1",), (1.0,), mirrors=("v2",), sample=0.25)
    assert s.choose(None, 0.5, mirror_u=0.2).mirrors == ("v2",)
    assert s.choose(None, 0.5, mirror_u=0.3).mirrors == ()


async def test_canary_split_over_http(
    start: Any, write_config: Any, model_repo: Path, cancer_rows: Any
) -> None:
    extra = "[models.cancer.canary]\nweights = { v1 = 90, v2 = 10 }\n"
    client, _ = await start(
        write_config(model_section(mode="canary", repo=model_repo) + extra), seed=3
    )
    n = 2000
    body = infer_body(cancer_rows[:1])
    counts = {"v1": 0, "v2": 0}
    for _ in range(n):
        resp = await client.post("/v2/models/cancer/infer", json=body)
        assert resp.status == 200
        counts[resp.headers["x-model-version"]] += 1
    sigma = math.sqrt(n * 0.1 * 0.9)  # binomial: 13.4 requests
    assert abs(counts["v2"] - n * 0.1) <= 3 * sigma, counts


async def test_sticky_header_over_http(
    start: Any, write_config: Any, model_repo: Path, cancer_rows: Any
) -> None:
    models = model_section(mode="canary", repo=model_repo, extra='sticky_key = "X-User-Id"')
    models += "[models.cancer.canary]\nweights = { v1 = 50, v2 = 50 }\n"
    client, _ = await start(write_config(models))
    body = infer_body(cancer_rows[:1])
    seen: dict[str, str] = {}
    for rnd in range(3):
        for i in range(60):
            resp = await client.post(
                "/v2/models/cancer/infer", json=body, headers={"x-user-id": f"user-{i}"}
            )
            version = resp.headers["x-model-version"]
            assert seen.setdefault(f"user-{i}", version) == version, (rnd, i)
    assert set(seen.values()) == {"v1", "v2"}
