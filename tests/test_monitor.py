"""Monitoring: drift statistics, windows, sudden vs gradual, anomalies, feedback, alerts, webhook.

Statistical tests use fixed seeds. Traffic is drawn from the breast-cancer data itself (569 rows,
with replacement); the baseline is the 455 training rows' deciles, so sampling noise alone gives a
PSI near (bins - 1) / window (10 bins, 2000 rows: ~0.005) plus the train/test difference: far below
psi_alert = 0.25. A 1-sd shift of one feature moves most of its mass across deciles (PSI > 1).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_breast_cancer

from proxy.http.admin import create_admin_app
from proxy.models.repository import OnnxModel
from proxy.monitoring.alerts import Alerts
from proxy.monitoring.baseline import Baseline
from proxy.monitoring.drift import chi_square, fractions, js, ks, psi
from proxy.monitoring.tracker import VersionMonitor
from proxy.monitoring.webhook import WebhookSender

from .helpers import HISTOGRAM_SUFFIXES, HISTOGRAMS, METRICS, infer_body, model_section

ROWS = load_breast_cancer().data.astype(np.float32)
SD = ROWS.std(axis=0)
AREA = 3  # mean_area


@pytest.fixture(scope="module")
def v1(model_repo: Path) -> OnnxModel:
    return OnnxModel(model_repo / "cancer" / "v1")


def feed(
    mon: VersionMonitor, model: OnnxModel, gen: Any, rows: int, batch: int = 16
) -> list[tuple[int, Any]]:
    """Send `rows` rows in batches through the real model into the monitor; (row, event) pairs."""
    events = []
    for done in range(0, rows, batch):
        x = gen(done, batch)
        events += [(done, e) for e in mon.record(x, model.run(x))]
    return events + [(rows, e) for e in mon.flush()]


def test_statistics_on_known_distributions() -> None:
    p = np.array([0.25, 0.25, 0.25, 0.25])
    assert psi(p, fractions([25, 25, 25, 25])) == pytest.approx(0.0)
    assert ks(p, fractions([50, 50, 0, 0])) == pytest.approx(0.5)
    assert js(p, fractions([25, 25, 25, 25])) == pytest.approx(0.0)
    assert js(np.array([1.0, 0.0]), fractions([0, 10])) == pytest.approx(1.0)  # disjoint: the max
    # PSI of a known shift: (0.4-0.25)ln(0.4/0.25) + (0.1-0.25)ln(0.1/0.25) = 0.2079
    assert psi(p, fractions([40, 10, 25, 25])) == pytest.approx(0.2079, abs=1e-3)
    stat, p_value = chi_square(np.array([0.5, 0.5]), np.array([50, 50]))
    assert stat == pytest.approx(0.0) and p_value == pytest.approx(1.0)
    assert chi_square(np.array([0.5, 0.5]), np.array([90, 10]))[1] < 1e-6
    # many distributions at once: one score per row, each the row's own; an empty row scores
    # as no observation (fractions all zero), not NaN
    counts = np.array([[25, 25, 25, 25], [50, 50, 0, 0], [40, 10, 25, 25], [0, 0, 0, 0]])
    expected = np.tile(p, (4, 1))
    for stat_fn in (psi, ks, js):
        rows = stat_fn(expected, fractions(counts))
        assert rows.shape == (4,) and np.isfinite(rows).all()
        for i in range(4):
            assert rows[i] == pytest.approx(stat_fn(p, fractions(counts[i])))


def reference_bins(manifest: dict[str, Any], x: np.ndarray) -> list[np.ndarray]:
    """Per feature, packaging's rule: searchsorted on the inner edges (side right), with values
    below min in an underflow bin (0) and above max in an overflow bin (B + 1)."""
    out = []
    for i, f in enumerate(manifest["baseline"]["features"]):
        e = np.asarray(f["edges"], dtype=np.float64)
        v = x[:, i].astype(np.float64)
        inner = np.clip(np.searchsorted(e[1:-1], v, side="right"), 0, len(e) - 2) + 1
        out.append(np.where(v < f["min"], 0, np.where(v > f["max"], len(e), inner)))
    return out


def reference_counts(manifest: dict[str, Any], x: np.ndarray) -> list[np.ndarray]:
    """Per feature, the counts of `reference_bins`: [under, bins..., over]."""
    return [
        np.bincount(b, minlength=len(f["edges"]) + 1)
        for b, f in zip(reference_bins(manifest, x), manifest["baseline"]["features"], strict=True)
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_uneven_batches_count_what_per_feature_binning_counts(v1: OnnxModel, dtype: Any) -> None:
    """Rows come in batches of 1..70 and are binned in sub-window chunks on one shared axis:
    the counts must equal a plain per-feature searchsorted, including values sitting exactly on
    an edge, at the minimum, at the maximum and outside the range; a judged window holds exactly
    `window` rows, and its KS/JS/chi-square (computed when read) equal the reference functions."""
    raw = v1.manifest.raw
    base = Baseline.from_manifest(raw)
    assert base is not None
    rng = np.random.default_rng(7)
    edges = [np.asarray(f["edges"], dtype=np.float32) for f in raw["baseline"]["features"]]
    x = ROWS[rng.integers(0, len(ROWS), 3000)].copy()
    on_edges = rng.random(x.shape) < 0.3  # 30% of values exactly on one of their feature's edges
    for i, e in enumerate(edges):
        picks = e[rng.integers(0, len(e), x.shape[0])]
        x[:, i] = np.where(on_edges[:, i], picks, x[:, i])
    x[::97] *= 3.0  # some rows far above the training range
    x[::89] -= 1e4  # and some below it
    mon = VersionMonitor(base, 2000, 20000, 0.1, 0.25)
    done = 0
    while done < len(x):
        n = int(rng.integers(1, 71))
        batch = x[done : done + n]
        mon.record(batch.astype(dtype), v1.run(batch))
        done += batch.shape[0]
        if done < 2000:  # before a window is complete, only whole sub-windows were binned
            assert int(mon.cumulative[0]) % mon.short.sub_rows == 0
    mon.flush()
    lay = mon.layout
    got = mon.cumulative[lay.features].reshape(base.n_features, base.width)
    for i, ref in enumerate(reference_counts(raw, x)):
        assert got[i, : ref.size].tolist() == ref.tolist(), raw["baseline"]["features"][i]["name"]
        assert got[i, ref.size :].sum() == 0
    assert int(mon.cumulative[0]) == len(x)
    out_of_range = sum(int(r[0] + r[-1]) for r in reference_counts(raw, x))
    assert int(mon.cumulative[1]) == out_of_range > 0
    j = mon.judged["short"]
    assert j.rows == 2000 == int(mon.short.total[0])
    window = mon.short.total[lay.features].reshape(base.n_features, base.width)
    for i in (0, AREA, base.n_features - 1):
        assert float(j.psi[i]) == pytest.approx(
            psi(base.fractions[i], fractions(window[i])), rel=1e-9
        )
        assert float(j.ks[i]) == pytest.approx(
            ks(base.fractions[i], fractions(window[i])), abs=1e-12
        )
        assert float(j.js[i]) == pytest.approx(
            js(base.fractions[i], fractions(window[i])), abs=1e-9
        )
    assert base.label_fractions is not None
    expected_p = chi_square(base.label_fractions, mon.short.total[lay.labels])[1]
    assert j.chi2_p == pytest.approx(expected_p)


def test_binning_is_exact_at_edges_zeros_and_float_neighbours() -> None:
    """Edges that are no float32 (0.1), a float32's next float64 (14.000000000000002, as
    quantile interpolation makes them), -0.0 against 0.0, negatives and huge values: every
    float32 and float64 value lands where a plain searchsorted of the raw edges puts it."""
    feats = [
        [-5.0, -1.0, -1e-30, 0.0, 0.1, 2.0],
        [7.691, 14.0, 14.000000000000002, 15.1, 28.11],
        [-3e38, -1.0, 1.0, 3e38],
        [0.0, 0.0, 1e-45, 1.0],  # tied quantiles, as np.unique leaves them
    ]
    manifest = {
        "baseline": {
            "features": [
                {
                    "name": f"f{i}",
                    "edges": e,
                    "fractions": [1.0 / (len(e) - 1)] * (len(e) - 1),
                    "min": e[0],
                    "max": e[-1],
                }
                for i, e in enumerate(feats)
            ]
        }
    }
    base = Baseline.from_manifest(manifest)
    assert base is not None
    rng = np.random.default_rng(3)
    cols = []
    for e in feats:
        e64 = np.asarray(e)
        around = np.concatenate(
            [e64, np.nextafter(e64, np.inf), np.nextafter(e64, -np.inf), [-0.0, 0.0, 5e-46]]
        )
        as32 = around.astype(np.float32)
        near = np.concatenate([as32, np.nextafter(as32, np.float32(np.inf))]).astype(np.float64)
        picks = np.concatenate([around, near, rng.uniform(min(e), max(e), 40)])
        cols.append(rng.choice(picks, 400))
    x64 = np.stack(cols, axis=1)
    with np.errstate(over="ignore"):
        x32 = x64.astype(np.float32)
    for x in (x32, x64):
        got = base.bin(x) - np.arange(len(feats)) * base.width
        for i, ref in enumerate(reference_bins(manifest, x.astype(np.float64))):
            assert got[:, i].tolist() == ref.tolist(), (x.dtype, i)


def test_clean_traffic_raises_nothing_over_five_windows(v1: OnnxModel) -> None:
    rng = np.random.default_rng(1)
    mon = VersionMonitor(Baseline.from_manifest(v1.manifest.raw), 2000, 20000, 0.1, 0.25)  # type: ignore[arg-type]
    events = feed(mon, v1, lambda d, n: ROWS[rng.integers(0, len(ROWS), n)], 5 * 2000)
    assert [e for _, e in events if e.level == "alert"] == []
    assert mon.judged["short"].rows == 2000 and float(mon.judged["short"].psi.max()) < 0.1
    assert mon.rates()["out_of_range"] < 0.01 and mon.rates()["duplicates"] < 0.02


def test_one_sd_shift_of_one_feature_alerts_within_one_window_as_sudden(v1: OnnxModel) -> None:
    rng = np.random.default_rng(2)
    mon = VersionMonitor(Baseline.from_manifest(v1.manifest.raw), 2000, 20000, 0.1, 0.25)  # type: ignore[arg-type]

    def shifted(done: int, n: int) -> Any:
        x = ROWS[rng.integers(0, len(ROWS), n)].copy()
        if done >= 4000:
            x[:, AREA] += SD[AREA]
        return x

    events = feed(mon, v1, shifted, 8000)
    alerts = [(row, e) for row, e in events if e.level == "alert"]
    assert alerts, "no alert"
    row, first = alerts[0]
    assert first.name == "mean_area" and first.kind == "sudden" and first.window == "short"
    assert row - 4000 <= 2000  # within one window of rows
    assert all(
        e.name in ("mean_area", "label", "probabilities[0]", "probabilities[1]") for _, e in alerts
    )


def test_slow_ramp_is_reported_as_gradual(v1: OnnxModel) -> None:
    rng = np.random.default_rng(3)
    mon = VersionMonitor(Baseline.from_manifest(v1.manifest.raw), 1000, 10000, 0.1, 0.25)  # type: ignore[arg-type]
    total = 3 * 10000  # 0 to 1.5 sd over three long windows

    def ramp(done: int, n: int) -> Any:
        x = ROWS[rng.integers(0, len(ROWS), n)].copy()
        x[:, AREA] += SD[AREA] * 1.5 * min(done / total, 1.0)
        return x

    events = feed(mon, v1, ramp, total)
    alerts = [e for _, e in events if e.level == "alert" and e.name == "mean_area"]
    assert alerts and alerts[0].kind == "gradual"


def test_duplicate_rows_are_seen(v1: OnnxModel) -> None:
    mon = VersionMonitor(Baseline.from_manifest(v1.manifest.raw), 1000, 10000, 0.1, 0.25)  # type: ignore[arg-type]
    rng = np.random.default_rng(4)

    def stuck(done: int, n: int) -> Any:
        x = ROWS[rng.integers(0, len(ROWS), n)].copy()
        x[: n // 2] = ROWS[7]  # half of every batch is the same row
        return x

    feed(mon, v1, stuck, 5000)
    assert mon.rates()["duplicates"] == pytest.approx(0.5, abs=0.05)


# ---------------------------------------------------------------- through the server


@pytest.fixture
async def hook(aiohttp_server: Any) -> Any:
    """A real webhook receiver: every alert POSTed to it, in order."""
    received: list[dict[str, Any]] = []
    arrived = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        received.append(await request.json())
        arrived.set()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", receive)
    server = await aiohttp_server(app)
    return received, f"http://127.0.0.1:{server.port}/hook"


def drift_config(repo: Path, url: str, extra: str = "") -> str:
    return (
        f'[alerts]\nwebhook = "{url}"\n'
        + model_section(repo=repo)
        + f"[models.cancer.drift]\nwindow = 500\nlong_window = 2500\nmin_feedback = 100\n{extra}"
    )


async def send_rows(client: Any, x: np.ndarray[Any, Any], per_request: int = 10) -> list[str]:
    ids = []
    for i in range(0, len(x), per_request):
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(x[i : i + per_request]))
        assert resp.status == 200, await resp.text()
        ids.append((await resp.json())["id"])
    return ids


async def test_drift_alert_fires_once_and_clears_once_at_the_webhook(
    start: Any, write_config: Any, model_repo: Path, hook: Any, aiohttp_client: Any
) -> None:
    received, url = hook
    client, serving = await start(write_config(drift_config(model_repo, url)))
    rng = np.random.default_rng(5)
    # windows of 500 and 2500 rows: fill both with normal traffic, shift mean_area by 1 sd for
    # 600 rows, then send normal traffic until the long window has forgotten the shift
    await send_rows(client, ROWS[rng.integers(0, len(ROWS), 2500)])
    serving.scheduler.housekeeping()
    assert not [a for a in received if a.get("state") == "firing"]
    shifted = ROWS[rng.integers(0, len(ROWS), 600)].copy()
    shifted[:, AREA] += SD[AREA]
    await send_rows(client, shifted)
    serving.scheduler.housekeeping()
    await send_rows(client, ROWS[rng.integers(0, len(ROWS), 3000)])  # back to normal
    serving.scheduler.housekeeping()
    assert serving.webhooks.sender is not None
    await asyncio.wait_for(serving.webhooks.sender.idle(), timeout=10)
    area = [a for a in received if a.get("feature") == "mean_area"]
    assert [a["state"] for a in area] == ["firing", "resolved"], area
    assert (
        area[0]["kind"] == "drift"
        and area[0]["change"] == "sudden"
        and area[0]["model"] == "cancer"
    )
    assert area[0]["value"] > 0.25
    # the same alerts are listed by the admin API, and drift scores are exported
    admin = await aiohttp_client(create_admin_app(serving))
    listed = await (await admin.get("/admin/alerts")).json()
    assert [a["state"] for a in listed["alerts"] if a.get("feature") == "mean_area"] == [
        "firing",
        "resolved",
    ]
    text = await (await admin.get("/metrics")).text()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert {
        "mlproxy_drift_score",
        "mlproxy_input_duplicate_ratio",
        "mlproxy_event_loop_lag_seconds",
        "mlproxy_alerts_open",
        "process_resident_memory_bytes",
        "mlproxy_queue_wait_seconds_bucket",
    } <= names
    # every mlproxy metric the live proxy exports is one the alert rules and dashboard know of

    def family(name: str) -> str:
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
                return name[: -len(suffix)]
        return name

    assert {family(n) for n in names if n.startswith("mlproxy_")} <= METRICS
    monitor = await (await admin.get("/admin/monitor")).json()
    v1 = monitor["models"]["cancer"]["versions"]["v1"]
    assert v1["features"][AREA]["name"] == "mean_area" and len(v1["features"][AREA]["live"]) == len(
        v1["features"][AREA]["baseline"]
    )


async def test_feedback_with_30_percent_wrong_labels_raises_concept_drift(
    start: Any, write_config: Any, model_repo: Path, hook: Any
) -> None:
    _received, url = hook
    client, serving = await start(write_config(drift_config(model_repo, url)))
    rng = np.random.default_rng(6)
    x = ROWS[rng.integers(0, len(ROWS), 300)]
    answers = []
    for row in x:
        resp = await client.post("/v2/models/cancer/infer", json=infer_body(row[None, :]))
        doc = await resp.json()
        answers.append((doc["id"], doc["outputs"][0]["data"][0]))
    wrong = rng.random(len(answers)) < 0.3
    for (rid, label), flip in zip(answers, wrong, strict=True):
        resp = await client.post(
            "/v2/models/cancer/feedback", json={"id": rid, "label": 1 - label if flip else label}
        )
        assert resp.status == 200, await resp.text()
    concept = [
        a for a in [a.to_json() for a in serving.alerts.recent()] if a["kind"] == "concept_drift"
    ]
    assert concept and concept[0]["state"] == "firing" and 0.6 < concept[0]["value"] < 0.8
    # bad feedback is a clear 4xx and breaks nothing
    resp = await client.post("/v2/models/cancer/feedback", json={"id": answers[0][0], "label": 1})
    assert resp.status == 404 and "already joined" in (await resp.json())["error"]
    resp = await client.post("/v2/models/cancer/feedback", json={"id": "nope", "label": 1})
    assert resp.status == 404
    ids = await send_rows(client, x[:4], per_request=4)
    resp = await client.post("/v2/models/cancer/feedback", json={"id": ids[0], "label": [1, 0]})
    assert resp.status == 400 and "one label per input row" in (await resp.json())["error"]
    resp = await client.post("/v2/models/cancer/feedback", json={"id": ids[0], "label": ["a"] * 4})
    assert resp.status == 400
    resp = await client.post(
        "/v2/models/cancer/feedback", json={"id": ids[0], "label": [1, 0, 1, 1]}
    )
    assert resp.status == 200 and (await resp.json())["rows"] == 4
    resp = await client.post("/v2/models/cancer/feedback", data=b"{not json")
    assert resp.status == 400


async def test_a_client_resending_one_row_raises_the_duplicate_signal(
    start: Any, write_config: Any, model_repo: Path, hook: Any
) -> None:
    _, url = hook
    client, serving = await start(write_config(drift_config(model_repo, url)))
    await send_rows(client, np.repeat(ROWS[3:4], 600, axis=0))
    serving.scheduler.housekeeping()
    dup = [
        a for a in [a.to_json() for a in serving.alerts.recent()] if a["kind"] == "duplicate_inputs"
    ]
    assert dup and dup[0]["state"] == "firing" and dup[0]["value"] == pytest.approx(1.0)
    from proxy.http.admin import status

    v1 = status(serving)["models"]["cancer"]["versions"]["v1"]
    # per version, in /admin/status (one row over and over is drift too, on every feature)
    assert "duplicate_inputs" in {a["kind"] for a in v1["alerts"]}


async def test_non_finite_inputs_are_refused_and_counted(
    start: Any, write_config: Any, model_repo: Path
) -> None:
    client, serving = await start(write_config(model_section(repo=model_repo)))
    body = {
        "inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP64", "data": [1e300] * 30}]
    }
    resp = await client.post("/v2/models/cancer/infer", json=body)
    assert resp.status == 400
    assert serving.counters.nonfinite_counts() == {"cancer": 1}


async def test_overload_fires_when_loop_lag_holds_and_clears(
    start: Any, write_config: Any, model_repo: Path
) -> None:
    _, serving = await start(
        write_config(
            "[alerts]\noverload_lag_ms = 50\noverload_for_s = 2\n" + model_section(repo=model_repo)
        )
    )
    load = serving.load
    load.lag(0.2)
    serving.scheduler.housekeeping(100.0)
    assert not serving.alerts.open_alerts()  # not held long enough yet
    serving.scheduler.housekeeping(102.5)
    assert [a.kind for a in serving.alerts.open_alerts()] == ["overload"]
    load.lag(0.001)
    serving.scheduler.housekeeping(103.0)
    assert (
        serving.alerts.open_alerts() == []
        and [a.to_json() for a in serving.alerts.recent()][-1]["state"] == "resolved"
    )


async def test_webhook_retries_with_backoff_then_delivers(aiohttp_server: Any) -> None:
    import aiohttp

    calls: list[int] = []

    async def flaky(request: web.Request) -> web.Response:
        calls.append(1)
        return web.json_response({}, status=503 if len(calls) < 3 else 200)

    app = web.Application()
    app.router.add_post("/", flaky)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as http:
        sender = WebhookSender(f"http://127.0.0.1:{server.port}/", http, first_backoff_s=0.001)
        sender.start()
        alerts = Alerts()
        alerts.listen(sender.submit)
        alerts.fire("k", "drift", model="m", version="v", message="x")
        await asyncio.wait_for(sender.idle(), timeout=10)
        await sender.close()
    assert len(calls) == 3 and sender.counts == {"ok": 1, "failed": 0, "dropped": 0}


def test_alert_fires_once_until_resolved() -> None:
    alerts = Alerts()
    assert alerts.fire("k", "drift", model="m", version="v", message="a")
    assert not alerts.fire("k", "drift", model="m", version="v", message="again")
    assert alerts.resolve("k", "gone") and not alerts.resolve("k", "gone")
    assert [a["state"] for a in [a.to_json() for a in alerts.recent()]] == ["firing", "resolved"]
    assert orjson.loads(orjson.dumps([a.to_json() for a in alerts.recent()]))[1]["kind"] == "drift"


def test_latency_percentiles_from_buckets_within_3_percent() -> None:
    from proxy.engine.stats import LatencyHistogram

    rng = np.random.default_rng(7)
    for median_s in (80e-6, 2e-3, 0.5):
        samples = rng.lognormal(np.log(median_s), 0.8, 20_000)
        hist = LatencyHistogram()
        hist.observe_many(samples)
        for q in (0.5, 0.9, 0.99):
            want = float(np.quantile(samples, q))
            got = hist.quantile(q)
            assert got is not None and abs(got - want) / want < 0.03, (median_s, q, got, want)


def test_prediction_store_keeps_the_last_predictions() -> None:
    from proxy.monitoring.feedback import PredictionStore
    from proxy.protocol.ids import RequestIds

    store = PredictionStore(3, RequestIds())
    for i in range(5):
        store.put(f"r{i}", "v1", np.array([i]))
    assert store.evicted == 2 and len(store) == 3
    assert store.pop("r0") is None and store.pop("r1") is None
    got = store.pop("r3")
    assert got is not None and got.version == "v1" and got.labels.tolist() == [3]
    assert store.pop("r3") is None  # joined once
    store.put("r4", "v2", np.array([9]))  # the same id again: the newer answer wins
    got = store.pop("r4")
    assert got is not None and got.version == "v2" and got.labels.tolist() == [9]
    assert store.pop("r4") is None
    batch = np.array([[1], [0], [1]])  # several rows: kept as a flat copy, not a view
    store.put("r5", "v1", batch)
    batch[:] = 7
    got = store.pop("r5")
    assert got is not None and got.labels.tolist() == [1, 0, 1] and got.labels.shape == (3,)


def test_prediction_store_keeps_made_up_ids_by_counter() -> None:
    """Answers to requests without an id are kept by the id's counter, with no dict entry."""
    from proxy.monitoring.feedback import PredictionStore
    from proxy.protocol.ids import RequestIds

    made = RequestIds()
    store = PredictionStore(3, made)
    ids, seqs = zip(*(made.new() for _ in range(5)), strict=True)
    assert [made.seq_of(i) for i in ids] == list(seqs) and made.seq_of("client-7") is None
    for i, (rid, seq) in enumerate(zip(ids, seqs, strict=True)):
        store.put(rid, "v1", np.array([i % 2]), seq)
    assert store.evicted == 2 and len(store) == 3
    assert store.pop(ids[0]) is None and store.pop(ids[1]) is None  # overwritten by 3 and 4
    got = store.pop(ids[4])
    assert got is not None and got.version == "v1" and got.labels.tolist() == [0]
    assert store.pop(ids[4]) is None and len(store) == 2  # joined once
    store.put("client-id", "v2", np.array([1]))  # a client's id goes through the dict
    assert len(store) == 3 and store.pop("client-id") is not None


# ---------------------------------------------------------------- regression models


@pytest.fixture(scope="module")
def regression_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray[Any, Any]]:
    """prices/r1: a linear regression on 4 features, packaged by the real `package` code."""
    from sklearn.linear_model import LinearRegression

    from proxy.packaging import package_model

    rng = np.random.default_rng(11)
    x = rng.normal(size=(1200, 4))
    y = x @ np.array([3.0, -2.0, 1.0, 0.5]) + rng.normal(scale=0.5, size=1200)
    repo = tmp_path_factory.mktemp("regression") / "models"
    model = LinearRegression().fit(x[:1000], y[:1000])
    package_model(
        model, x[:1000], name="prices", version="r1", repo=repo, holdout=(x[1000:], y[1000:])
    )
    return repo, np.concatenate([x, y[:, None]], axis=1)


def regression_config(repo: Path) -> str:
    section = model_section(
        repo=repo, name="prices", stable="r1", versions={"r1": f'{{ path = "{repo}/prices/r1" }}'}
    )
    return section + "[models.prices.drift]\nwindow = 200\nlong_window = 1000\nmin_feedback = 100\n"


async def send_prices(client: Any, x: np.ndarray[Any, Any]) -> list[tuple[str, float]]:
    out = []
    for row in x:
        resp = await client.post(
            "/v2/models/prices/infer", json=infer_body(row[None, :].astype(np.float32))
        )
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
        out.append((doc["id"], float(doc["outputs"][0]["data"][0])))
    return out


async def test_regression_output_drift_and_mae_concept_drift(
    start: Any, write_config: Any, regression_repo: Any, aiohttp_client: Any
) -> None:
    """A regression model's output is watched like a feature (`variable`), and fed-back true
    values give a rolling MAE, judged against the manifest's holdout MAE."""
    repo, data = regression_repo
    x, y = data[:, :4], data[:, 4]
    client, serving = await start(write_config(regression_config(repo)))
    holdout_mae = OnnxModel(repo / "prices" / "r1").manifest.raw["metrics"]["holdout"]["mae"]
    assert 0.3 < holdout_mae < 0.5  # the noise's scale, 0.5 * sqrt(2 / pi)

    answers = await send_prices(client, x[1000:1200])
    serving.scheduler.housekeeping()
    vw = serving.watch.versions[("prices", "r1")]
    assert vw.monitor is not None and vw.monitor.baseline.names[-1] == "variable"
    short = vw.monitor.judged["short"]
    assert short.psi[-1] < 0.25  # outputs of in-distribution rows look like training's

    # true values fed back: the honest ones keep MAE near holdout, no alert
    for (rid, _), truth in zip(answers[:100], y[1000:1100], strict=True):
        resp = await client.post("/v2/models/prices/feedback", json={"id": rid, "value": truth})
        assert resp.status == 200, await resp.text()
    mae = vw.accuracy.mae("short")
    assert mae is not None and mae == pytest.approx(
        float(np.mean(np.abs(np.array([p for _, p in answers[:100]]) - y[1000:1100]))), rel=1e-6
    )
    assert not [
        a for a in [a.to_json() for a in serving.alerts.recent()] if a["kind"] == "concept_drift"
    ]
    # the world changed: the truth moved by 2 while the model did not
    for (rid, _), truth in zip(answers[100:200], y[1100:1200] + 2.0, strict=True):
        resp = await client.post("/v2/models/prices/feedback", json={"id": rid, "label": truth})
        assert resp.status == 200, await resp.text()
    fired = [
        a for a in [a.to_json() for a in serving.alerts.recent()] if a["kind"] == "concept_drift"
    ]
    assert fired and fired[0]["state"] == "firing" and fired[0]["statistic"] == "mae"
    assert fired[0]["value"] > holdout_mae * 1.5
    # the admin API and /metrics show it; the dashboard reads the same "mae" block
    admin = await aiohttp_client(create_admin_app(serving))
    monitor = await (await admin.get("/admin/monitor")).json()
    r1 = monitor["models"]["prices"]["versions"]["r1"]
    assert r1["mae"]["holdout"] == holdout_mae and r1["mae"]["short"] > holdout_mae * 1.5
    text = await (await admin.get("/metrics")).text()
    assert 'mlproxy_mae{model="prices",version="r1",window="short"}' in text
    assert 'mlproxy_holdout_mae{model="prices",version="r1"}' in text

    # the output distribution moves when the inputs push it: output drift, named `variable`
    await send_prices(client, x[:200] + np.array([2.0, -2.0, 0.0, 0.0]))
    serving.scheduler.housekeeping()
    assert vw.monitor.judged["short"].psi[-1] > 0.25
    drift = [
        a
        for a in [a.to_json() for a in serving.alerts.recent()]
        if a["kind"] == "drift" and a.get("feature") == "variable"
    ]
    assert drift and drift[0]["state"] == "firing"

    # bad values are a clear 400 and change nothing
    rid = (await send_prices(client, x[:1]))[0][0]
    for bad in ({"id": rid, "value": "high"}, {"id": rid, "value": [[1.0]]}, {"id": rid}):
        resp = await client.post("/v2/models/prices/feedback", json=bad)
        assert resp.status == 400, bad
    resp = await client.post(
        "/v2/models/prices/feedback", data=b'{"id": "%s", "value": NaN}' % rid.encode()
    )
    assert resp.status == 400


async def test_a_classifier_refuses_fractional_labels(
    start: Any, write_config: Any, model_repo: Path
) -> None:
    client, _serving = await start(write_config(model_section(repo=model_repo)))
    ids = await send_rows(client, ROWS[:1], per_request=1)
    resp = await client.post("/v2/models/cancer/feedback", json={"id": ids[0], "label": 0.5})
    assert resp.status == 400 and "integer class" in (await resp.json())["error"]
    resp = await client.post("/v2/models/cancer/feedback", json={"id": ids[0], "label": 1})
    assert resp.status == 200  # the refused call left the prediction in place


def _pooled_run(
    v1: OnnxModel, gen: Any, rows: int, *, window: int, interval_rows: int, batch: int = 16
) -> tuple[VersionMonitor, VersionMonitor, list[tuple[int, Any]]]:
    """`workers = 2` in one test: two worker monitors take alternate batches of `gen`'s rows
    and only count; every `interval_rows` rows (a publish interval) the pooled monitor is
    advanced with the sum of their cumulative counts. Returns (a local monitor fed the same
    rows, the pooled one, the pooled one's (row, event) pairs)."""
    baseline = Baseline.from_manifest(v1.manifest.raw)  # type: ignore[arg-type]
    local = VersionMonitor(baseline, window, 10 * window, 0.1, 0.25)
    workers = [
        VersionMonitor(baseline, window, 10 * window, 0.1, 0.25, role="worker") for _ in range(2)
    ]
    pooled = VersionMonitor(baseline, window, 10 * window, 0.1, 0.25, role="pooled")
    events: list[tuple[int, Any]] = []
    for done in range(0, rows, batch):
        x = gen(done, batch)
        out = v1.run(x)
        local.record(x, out)
        assert workers[(done // batch) % 2].record(x, out) == []  # a worker never judges
        if (done + batch) % interval_rows == 0:
            for w in workers:
                w.flush()  # a worker's housekeeping, before it publishes
            total = workers[0].cumulative + workers[1].cumulative
            events += [(done + batch, e) for e in pooled.advance(total)]
    local.flush()
    assert all(w.judged == {} for w in workers)
    return local, pooled, events


@pytest.mark.parametrize(
    "interval_rows", [80, 5000]
)  # many publishes a sub-window; or a window in one
def test_pooled_windows_judge_like_one_process(v1: OnnxModel, interval_rows: int) -> None:
    """Drift judged on two workers' pooled counts: the window holds `window` rows, its PSI is
    the one-process PSI of the same rows (to 0.02: an interval's rows are taken as alike), clean
    traffic raises nothing over five windows."""
    rng = np.random.default_rng(5)
    local, pooled, events = _pooled_run(
        v1, lambda d, n: ROWS[rng.integers(0, len(ROWS), n)], 10_000, window=2000,
        interval_rows=interval_rows,
    )  # fmt: skip
    assert [e for _, e in events if e.level == "alert"] == []
    short = pooled.judged["short"]
    assert short.rows == 2000
    assert float(np.abs(short.psi - local.judged["short"].psi).max()) < 0.02
    assert int(pooled.cumulative[0]) == 10_000


def test_pooled_windows_alert_once_on_a_shift(v1: OnnxModel) -> None:
    """A 1 sd shift of mean_area seen by both workers alerts once, as sudden, within a window
    (plus one publish interval) of rows, on the pooled counts."""
    rng = np.random.default_rng(6)

    def shifted(done: int, n: int) -> Any:
        x = ROWS[rng.integers(0, len(ROWS), n)].copy()
        if done >= 4000:
            x[:, AREA] += SD[AREA]
        return x

    _, _, events = _pooled_run(v1, shifted, 10_000, window=2000, interval_rows=400)
    area = [(row, e) for row, e in events if e.name == "mean_area" and e.level == "alert"]
    assert len(area) == 1, area
    row, first = area[0]
    assert first.kind == "sudden" and row - 4000 <= 2000 + 400
