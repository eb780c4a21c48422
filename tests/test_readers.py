"""Readers read: a scrape, a status page or the dashboard's data never judges or alerts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_breast_cancer

from proxy.http.admin import create_admin_app

from .helpers import infer_body, model_section

ROWS = load_breast_cancer().data.astype(np.float32)
AREA = 3  # mean_area


async def _send(client: Any, x: np.ndarray[Any, Any], per_request: int = 10) -> None:
    for i in range(0, len(x), per_request):
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(x[i : i + per_request]))
        assert resp.status == 200, await resp.text()


def _drift_alerts(serving: Any) -> list[dict[str, Any]]:
    return [a.to_json() for a in serving.alerts.recent() if a.kind == "drift"]


async def test_reads_do_not_judge_drift_housekeeping_does(
    start: Any, write_config: Any, model_repo: Path, aiohttp_client: Any
) -> None:
    # window 200 = 10 sub-windows of 20 rows; the record path bins once 100 rows wait. So after
    # a full clean window, 90 shifted rows wait unbinned: binning them completes 4 sub-windows,
    # each judged, and 80 of 200 rows shifted by 3 sd is far over psi_alert.
    client, serving = await start(
        write_config(
            model_section(repo=model_repo)
            + "[models.cancer.drift]\nwindow = 200\nlong_window = 2000\n"
        )
    )
    rng = np.random.default_rng(11)
    await _send(client, ROWS[rng.integers(0, len(ROWS), 200)])
    serving.scheduler.housekeeping()
    assert _drift_alerts(serving) == []
    shifted = ROWS[rng.integers(0, len(ROWS), 90)].copy()
    shifted[:, AREA] += 3 * ROWS[:, AREA].std()
    await _send(client, shifted)

    admin = await aiohttp_client(create_admin_app(serving))
    for path in ("/metrics", "/admin/status", "/admin/monitor", "/admin/alerts"):
        for _ in range(2):
            assert (await admin.get(path)).status == 200, path
    assert _drift_alerts(serving) == [], "a read judged the buffered rows and raised an alert"
    status = await (await admin.get("/admin/status")).json()
    assert status["open_alerts"] == []

    serving.scheduler.housekeeping()  # the timer's step: now the rows are binned and judged
    fired = _drift_alerts(serving)
    assert [a["feature"] for a in fired if a["state"] == "firing"] == ["mean_area"], fired
    status = await (await admin.get("/admin/status")).json()
    assert [a["feature"] for a in status["open_alerts"]] == ["mean_area"]
