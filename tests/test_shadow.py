"""Shadow mode: the primary answers alone; mirrors are compared, bounded, and never in the way."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy.engine.mirror import MirrorLane
from proxy.engine.stats import MirrorStats

from .helpers import infer_body, model_section, reference


def shadow_config(
    model_repo: Path, *, mirror: str = "v2", url: str | None = None, extra: str = ""
) -> str:
    versions = {
        "v1": f'{{ path = "{model_repo}/cancer/v1" }}',
        "v2": f'{{ path = "{model_repo}/cancer/v2" }}',
    }
    if url is not None:
        versions["v3"] = f'{{ url = "{url}" }}'
    section = model_section(mode="shadow", repo=model_repo, versions=versions)
    return (
        section
        + f'[models.cancer.shadow]\nprimary = "v1"\nmirrors = ["{mirror}"]\nsample = 1.0\n{extra}'
    )


async def test_local_mirror_is_compared_with_the_primary(
    start: Any, write_config: Any, model_repo: Path, cancer_rows: Any
) -> None:
    client, serving = await start(write_config(shadow_config(model_repo)))
    rows = cancer_rows[:300]
    for i in range(0, 300, 3):
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(rows[i : i + 3]))
        assert resp.status == 200 and resp.headers["x-model-version"] == "v1"
    mp = serving.plan.models["cancer"]
    await asyncio.wait_for(mp.lanes["v2"].drained(), timeout=10)
    m = mp.stats["v2"].mirror
    assert m.sent == 300 and m.dropped == 0 and m.failed == 0 and m.compared == 300
    v1, v2 = reference(model_repo, "v1", rows), reference(model_repo, "v2", rows)
    assert m.agreement() == pytest.approx(float(np.mean(v1["label"] == v2["label"])))
    assert m.mean_abs_diff() == pytest.approx(
        float(np.mean(np.abs(v1["probabilities"] - v2["probabilities"]))), rel=1e-5
    )
    assert mp.stats["v2"].requests == 0  # a mirror never answers a client


async def test_slow_mirror_costs_the_primary_nothing(
    start: Any, write_config: Any, model_repo: Path, gated_upstream: Any, cancer_rows: Any
) -> None:
    up, _, url = gated_upstream
    config = write_config(
        shadow_config(
            model_repo, mirror="v3", url=url, extra="queue_rows = 16\ntimeout_ms = 60000\n"
        )
    )
    client, serving = await start(config)
    up.gate.clear()  # the mirror takes as long as the test wants: it answers nothing until released
    rows = cancer_rows[:50]
    want = reference(model_repo, "v1", rows)
    for i in range(50):
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(rows[i : i + 1]))
        assert resp.status == 200 and resp.headers["x-model-version"] == "v1"
        doc = await resp.json()
        assert doc["outputs"][0]["data"] == [int(want["label"][i])]
    # every primary answer came back while the mirror was still holding its first batch
    assert up.received >= 1 and up.answered == 0
    m = serving.plan.models["cancer"].stats["v3"].mirror
    assert m.sent + m.dropped == 50
    assert m.dropped > 0 and serving.plan.models["cancer"].lanes["v3"].queued_rows <= 16
    up.gate.set()
    await asyncio.wait_for(serving.plan.models["cancer"].lanes["v3"].drained(), timeout=10)
    assert m.compared == m.sent and m.failed == 0
    v2 = reference(model_repo, "v2", rows)
    assert 0.8 <= m.agreement() <= 1.0  # v1 and v2 agree on most rows
    assert float(np.mean(want["label"] == v2["label"])) >= 0.8


async def test_dead_mirror_trips_the_breaker(
    start: Any, write_config: Any, model_repo: Path, gated_upstream: Any, cancer_rows: Any
) -> None:
    _, server, url = gated_upstream
    extra = "breaker_failures = 3\nbreaker_pause_s = 3600\ntimeout_ms = 200\n"
    client, serving = await start(
        write_config(shadow_config(model_repo, mirror="v3", url=url, extra=extra))
    )
    await server.close()  # the mirror dies after the proxy loaded it
    lane = serving.plan.models["cancer"].lanes["v3"]
    m = serving.plan.models["cancer"].stats["v3"].mirror
    for i in range(400):
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[i : i + 1]))
        assert resp.status == 200 and resp.headers["x-model-version"] == "v1"
        if lane.breaker_open:
            break
        await asyncio.wait_for(lane.drained(), timeout=10)  # one failed batch per request
    assert lane.breaker_open, (m.failed, m.sent)
    assert m.breaker_opened == 1 and m.failed == 3
    before = m.dropped
    for i in range(20):
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[i : i + 1]))
        assert resp.status == 200
    assert m.dropped == before + 20  # while open, mirrored rows are dropped at once


async def test_mirror_that_times_out_is_counted_not_raised(
    start: Any, write_config: Any, model_repo: Path, gated_upstream: Any, cancer_rows: Any
) -> None:
    up, _, url = gated_upstream
    extra = "breaker_failures = 100\ntimeout_ms = 50\n"
    client, serving = await start(
        write_config(shadow_config(model_repo, mirror="v3", url=url, extra=extra))
    )
    up.gate.clear()
    lane = serving.plan.models["cancer"].lanes["v3"]
    resp = await client.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[:2]))
    assert resp.status == 200
    await asyncio.wait_for(lane.drained(), timeout=10)
    m = serving.plan.models["cancer"].stats["v3"].mirror
    assert (
        m.failed == 2 and m.compared == 0 and serving.plan.models["cancer"].stats["v1"].errors == 0
    )


async def test_sample_fraction_is_mirrored(
    start: Any, write_config: Any, model_repo: Path, cancer_rows: Any
) -> None:
    config = write_config(shadow_config(model_repo).replace("sample = 1.0", "sample = 0.2"))
    client, serving = await start(config, seed=11)
    n = 1000
    for i in range(n):
        await client.post(
            "/v2/models/cancer/infer", json=infer_body(cancer_rows[i % 500 : i % 500 + 1])
        )
    mp = serving.plan.models["cancer"]
    await asyncio.wait_for(mp.lanes["v2"].drained(), timeout=10)
    m = mp.stats["v2"].mirror
    sigma = (n * 0.2 * 0.8) ** 0.5  # binomial: 12.6
    assert abs(m.sent + m.dropped - n * 0.2) <= 3 * sigma


class HeldMirror:
    """A mirror version that hands each batch to the test and answers when the test says so:
    it answers each row's first value as its label and the row itself as its floats."""

    version = "held"
    kind = "local"

    def __init__(self) -> None:
        self.batches: asyncio.Queue[tuple[np.ndarray[Any, Any], asyncio.Future[None]]] = (
            asyncio.Queue()
        )

    async def infer(self, x: Any, *, background: bool = False) -> dict[str, Any]:
        release = asyncio.get_running_loop().create_future()
        await self.batches.put((x, release))
        await release
        return {"label": x[:, 0].astype(np.int64), "echo": x.copy()}


async def test_mirror_queue_keeps_rows_and_answers_together_across_its_buffer_end() -> None:
    """The queue is one preallocated buffer: rows slide back to its start when its end is
    reached, and each batch carries exactly the primary's answers to its own rows (the mirror
    answers the same as the primary for the same row, so every compared row agrees)."""
    mirror, stats = HeldMirror(), MirrorStats()
    lane = MirrorLane(
        mirror,
        stats,
        queue_rows=10,
        max_batch_rows=256,
        timeout_s=10.0,
        breaker_failures=3,
        breaker_pause_s=1.0,
        clock=asyncio.get_running_loop().time,
        linger_s=0.0,
    )
    rows = np.arange(12, dtype=np.float32)[:, None] + np.array([[0.0, 0.25, 0.5]], np.float32)
    answers = {"label": np.arange(12, dtype=np.int64), "echo": rows.copy()}

    def offer(i: int, n: int) -> None:  # no await in between: the lane's task cannot run
        lane.offer(rows[i : i + n], {k: v[i : i + n] for k, v in answers.items()})

    async def next_batch() -> tuple[np.ndarray[Any, Any], asyncio.Future[None]]:
        return await asyncio.wait_for(mirror.batches.get(), timeout=10)

    lane.start()
    try:
        offer(0, 4)
        offer(4, 4)
        x, release = await next_batch()
        assert x.tolist() == rows[:8].tolist() and lane.queued_rows == 0
        offer(8, 3)
        offer(0, 3)
        lane.max_batch_rows = 2
        release.set_result(None)
        x, release = await next_batch()  # head moves to 2 of the 6 queued rows
        assert x.tolist() == rows[8:10].tolist() and lane.queued_rows == 4
        offer(3, 5)  # 4 + 5 rows fit the queue of 10, not the buffer's end: slide back, append
        assert lane.queued_rows == 9
        offer(0, 2)  # 11 rows would not fit: dropped and counted
        assert stats.dropped == 2
        lane.max_batch_rows = 256
        release.set_result(None)
        x, release = await next_batch()
        want = np.concatenate([rows[10:11], rows[0:3], rows[3:8]])
        assert x.tolist() == want.tolist() and lane.queued_rows == 0
        release.set_result(None)
        await asyncio.wait_for(lane.drained(), timeout=10)
    finally:
        await lane.close()
    assert stats.sent == 8 + 6 + 5 and stats.compared == 8 + 2 + 9
    assert stats.label_rows == stats.agreed == stats.compared  # answers stayed with their rows
    assert stats.abs_diff_sum == 0.0 and stats.abs_diff_count == stats.compared * 3


async def test_mirrors_yield_to_a_busy_serving_loop(
    start: Any, write_config: Any, model_repo: Path, cancer_rows: Any
) -> None:
    """While the loop uses nearly all of its CPU, a mirror takes one request in eight and counts
    the rest as yielded; it takes every request again once the loop has CPU to spare."""
    from proxy.engine.mirror import BUSY_KEEP_EVERY

    client, serving = await start(write_config(shadow_config(model_repo)))
    mp = serving.plan.models["cancer"]
    m = mp.stats["v2"].mirror

    async def send(n: int) -> None:
        for i in range(n):
            resp = await client.post(
                "/v2/models/cancer/infer", json=infer_body(cancer_rows[i : i + 1])
            )
            assert resp.status == 200 and resp.headers["x-model-version"] == "v1"
        await asyncio.wait_for(mp.lanes["v2"].drained(), timeout=10)

    serving.load.measure(0.95, serving.plan)
    assert serving.load.mirrors_yield
    await send(2 * BUSY_KEEP_EVERY)
    assert (m.sent, m.yielded, m.compared) == (2, 2 * BUSY_KEEP_EVERY - 2, 2)
    serving.load.measure(0.8, serving.plan)  # between the thresholds: still yielding (no flapping)
    assert serving.load.mirrors_yield
    serving.load.measure(0.5, serving.plan)
    assert not serving.load.mirrors_yield
    await send(5)
    assert (m.sent, m.yielded, m.compared) == (7, 2 * BUSY_KEEP_EVERY - 2, 7)
    assert mp.stats["v2"].summary()["mirror"]["yielded"] == 2 * BUSY_KEEP_EVERY - 2
