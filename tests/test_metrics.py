"""Prometheus export: every family and sample the collectors render for hand-built snapshots.

The expected samples are written out: they pin what the exporter renders (names, labels, values),
so a change to the collectors that alters a single sample fails here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy.engine.stats import LatencyHistogram, MirrorStats, VersionStats
from proxy.http.metrics import ProxyCollector, render
from proxy.http.monitor_metrics import MonitorCollector
from proxy.http.snapshots import MonitorSnapshot, MonitorView, Snapshot, VersionView
from proxy.models.backends import BackendKind
from proxy.models.remote import UpstreamHealth
from proxy.monitoring.drift import Judgement

Sample = tuple[str, dict[str, str], float]
Family = tuple[str, str, list[Sample]]  # type, help, samples

# The exported latency bounds: every 10th edge of stats.LATENCY_EDGES (10**(k/40) s), then +Inf.
LE = (
    "5.01187e-05", "8.91251e-05", "0.000158489", "0.000281838", "0.000501187", "0.000891251",
    "0.00158489", "0.00281838", "0.00501187", "0.00891251", "0.0158489", "0.0281838",
    "0.0501187", "0.0891251", "0.158489", "0.281838", "0.501187", "0.891251", "1.58489",
    "2.81838", "5.01187", "8.91251", "15.8489", "28.1838", "+Inf",
)  # fmt: skip


def _latency(*seconds: float) -> LatencyHistogram:
    h = LatencyHistogram()
    for s in seconds:
        h.observe(s)
    return h


def _histogram(
    name: str, labels: dict[str, str], bounds: tuple[str, ...], counts: list[int], total: float
) -> list[Sample]:
    """The samples of one histogram: its cumulative buckets, _count (the +Inf bucket), _sum."""
    assert len(bounds) == len(counts)
    out: list[Sample] = [
        (f"{name}_bucket", {**labels, "le": le}, c) for le, c in zip(bounds, counts, strict=True)
    ]
    return [*out, (f"{name}_count", labels, counts[-1]), (f"{name}_sum", labels, total)]


R1_HEALTH = UpstreamHealth(
    url="http://127.0.0.1:9/v2/models/prices",
    state="closed",
    problem=None,
    failures_in_a_row=0,
    breaker_opened=0,
    retry_in_s=None,
    ejected=0,
    retries=4,
    retries_denied=1,
)
R2_HEALTH = UpstreamHealth(
    url="http://127.0.0.1:9/v2/models/prices2",
    state="open",
    problem="timed out",
    failures_in_a_row=5,
    breaker_opened=2,
    retry_in_s=1.5,
    ejected=17,
    retries=0,
    retries_denied=0,
)
UPSTREAM_HELP = {
    "mlproxy_version_available": "1 when the version can take traffic; 0 while a remote one is"
    " unavailable (its metadata not answered) or ejected by its circuit breaker.",
    "mlproxy_upstream_ejections": "Times a remote version's circuit breaker opened after failed"
    " calls in a row.",
    "mlproxy_upstream_refused_calls": "Calls to a remote version refused at once, the upstream"
    " not called (unavailable or ejected); the request fell back to stable or was answered 503.",
    "mlproxy_upstream_retries": "Retries after a failed connection to a remote version: granted,"
    " or denied by the retry budget.",
}
UPSTREAM_EMPTY: dict[str, Any] = {
    name: ("gauge" if name == "mlproxy_version_available" else "counter", help_, [])
    for name, help_ in UPSTREAM_HELP.items()
}


def proxy_snapshot() -> Snapshot:
    """cancer/v1: onnx primary with batching; cancer/v2: onnx mirror with label agreement and
    float diffs; prices/r1: remote mirror that sent rows but compared none; prices/r2: remote,
    dropped rows only; one rollout in each status."""
    v1 = VersionStats(requests=5, errors=1, rows=12, latency=_latency(0.001, 0.003, 0.003, 2.0))
    v2 = VersionStats(
        mirror=MirrorStats(
            sent=10,
            dropped=2,
            yielded=1,
            failed=1,
            compared=8,
            label_rows=8,
            agreed=6,
            abs_diff_sum=0.5,
            abs_diff_count=4,
            breaker_opened=1,
        )
    )
    r1 = VersionStats(
        requests=2, rows=2, latency=_latency(0.02, 40.0), mirror=MirrorStats(sent=3, failed=3)
    )
    r2 = VersionStats(mirror=MirrorStats(dropped=4))
    onnx, remote = BackendKind.ONNX, BackendKind.REMOTE
    return Snapshot(
        versions=[
            VersionView(
                "cancer", "v1", onnx, 0.75, v1, batches=4, batch_rows=12, queue_depth=2, shed=1
            ),
            VersionView("cancer", "v2", onnx, 0.25, v2, fallbacks=3),
            VersionView("prices", "r1", remote, 1.0, r1, fallbacks=1, upstream=R1_HEALTH),
            VersionView("prices", "r2", remote, 0.0, r2, available=False, upstream=R2_HEALTH),
        ],
        inflight=3,
        shed=7,
        config_loaded_at=1700000000.5,
        admission_limit=64,
        admission_waiting=5,
        refused={"body_timeout": 2, "malformed_http": 1},
        reloads={"ok": 4},
        rollouts={"a": "progressing", "b": "holding", "c": "promoted", "d": "rolled_back"},
        alerts=9,
        config_ok=False,
    )


def monitor_snapshot() -> MonitorSnapshot:
    """cancer/v1: both windows judged (long with a chi-square p-value), accuracy, queue waits and
    batch rows (one past the last bucket); prices/r1: long window judged with no class counts,
    MAE; prices/r2: nothing known; every alert kind open."""
    expected = np.array([[0.5, 0.5], [0.25, 0.75], [0.5, 0.5]])
    short = Judgement(4, expected, np.array([[1, 1], [1, 3], [3, 1]]))
    long = Judgement(
        8,
        expected,
        np.array([[2, 2], [4, 0], [1, 1]]),
        label_fractions=np.array([0.5, 0.5]),
        label_counts=np.array([3, 1]),
    )
    reg_expected = np.array([[0.2, 0.8], [0.5, 0.5]])
    reg_long = Judgement(
        5,
        reg_expected,
        np.array([[1, 4], [5, 0]]),
        label_fractions=np.array([0.5, 0.5]),
        label_counts=np.array([0, 0]),
    )
    none: dict[str, Any] = {
        "out_of_range": None,
        "duplicates": None,
        "accuracy_short": None,
        "accuracy_long": None,
        "holdout_accuracy": None,
        "mae_short": None,
        "mae_long": None,
        "holdout_mae": None,
        "queue_wait": None,
        "batch_rows": {},
    }
    cancer = MonitorView(
        model="cancer",
        version="v1",
        names=["f0", "f1", "label"],
        short=short,
        long=long,
        levels={"f0": 0, "f1": 2, "label": 1},
        out_of_range=0.125,
        duplicates=0.5,
        accuracy_short=0.75,
        accuracy_long=0.875,
        holdout_accuracy=0.9,
        mae_short=None,
        mae_long=None,
        holdout_mae=None,
        queue_wait=_latency(0.0001, 0.01),
        batch_rows={1: 3, 4: 2, 100: 1, 300: 1},
    )
    prices = MonitorView(
        **{
            **none,
            "mae_long": 1.5,
            "holdout_mae": 0.25,
        },
        model="prices",
        version="r1",
        names=["x", "variable"],
        short=None,
        long=reg_long,
        levels={"x": 1, "variable": 0},
    )
    quiet = MonitorView(
        **none, model="prices", version="r2", names=[], short=None, long=None, levels={}
    )
    return MonitorSnapshot(
        versions=[cancer, prices, quiet],
        loop_lag_s=0.0125,
        loop_busy=0.25,
        nonfinite={"cancer": 2, "prices": 0},
        feedback={("cancer", "ok"): 5, ("cancer", "unknown_id"): 1, ("prices", "ok"): 2},
        webhook={"ok": 2, "dropped": 1},
        open_alerts={
            "drift": 2,
            "concept_drift": 1,
            "overload": 1,
            "duplicate_inputs": 3,
            "canary_rollback": 1,
        },
    )


PROXY_EXPECTED: dict[str, Family] = {
    "mlproxy_requests": (
        "counter",
        "Inference requests answered by a version, by outcome.",
        [
            ("mlproxy_requests_total", {"model": "cancer", "version": "v1", "outcome": "ok"}, 4),
            ("mlproxy_requests_total", {"model": "cancer", "version": "v1", "outcome": "error"}, 1),
            ("mlproxy_requests_total", {"model": "cancer", "version": "v2", "outcome": "ok"}, 0),
            ("mlproxy_requests_total", {"model": "cancer", "version": "v2", "outcome": "error"}, 0),
            ("mlproxy_requests_total", {"model": "prices", "version": "r1", "outcome": "ok"}, 2),
            ("mlproxy_requests_total", {"model": "prices", "version": "r1", "outcome": "error"}, 0),
            ("mlproxy_requests_total", {"model": "prices", "version": "r2", "outcome": "ok"}, 0),
            ("mlproxy_requests_total", {"model": "prices", "version": "r2", "outcome": "error"}, 0),
        ],
    ),
    "mlproxy_rows": (
        "counter",
        "Input rows inferred by a version as primary.",
        [
            ("mlproxy_rows_total", {"model": "cancer", "version": "v1"}, 12),
            ("mlproxy_rows_total", {"model": "cancer", "version": "v2"}, 0),
            ("mlproxy_rows_total", {"model": "prices", "version": "r1"}, 2),
            ("mlproxy_rows_total", {"model": "prices", "version": "r2"}, 0),
        ],
    ),
    "mlproxy_request_duration_seconds": (
        "histogram",
        "Time from decoded request to encoded answer, per version that answered.",
        [
            *_histogram(
                "mlproxy_request_duration_seconds",
                {"model": "cancer", "version": "v1"},
                LE,
                [0, 0, 0, 0, 0, 0, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4],
                2.007,
            ),
            *_histogram(
                "mlproxy_request_duration_seconds",
                {"model": "cancer", "version": "v2"},
                LE,
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                0,
            ),
            *_histogram(
                "mlproxy_request_duration_seconds",
                {"model": "prices", "version": "r1"},
                LE,
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2],
                40.02,
            ),
            *_histogram(
                "mlproxy_request_duration_seconds",
                {"model": "prices", "version": "r2"},
                LE,
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                0,
            ),
        ],
    ),
    "mlproxy_traffic_weight_ratio": (
        "gauge",
        "Share of routed traffic a version gets now (0..1).",
        [
            ("mlproxy_traffic_weight_ratio", {"model": "cancer", "version": "v1"}, 0.75),
            ("mlproxy_traffic_weight_ratio", {"model": "cancer", "version": "v2"}, 0.25),
            ("mlproxy_traffic_weight_ratio", {"model": "prices", "version": "r1"}, 1),
            ("mlproxy_traffic_weight_ratio", {"model": "prices", "version": "r2"}, 0),
        ],
    ),
    "mlproxy_batches": (
        "counter",
        "onnxruntime runs (micro-batches).",
        [
            ("mlproxy_batches_total", {"model": "cancer", "version": "v1"}, 4),
            ("mlproxy_batches_total", {"model": "cancer", "version": "v2"}, 0),
        ],
    ),
    "mlproxy_batch_rows": (
        "counter",
        "Rows in those runs.",
        [
            ("mlproxy_batch_rows_total", {"model": "cancer", "version": "v1"}, 12),
            ("mlproxy_batch_rows_total", {"model": "cancer", "version": "v2"}, 0),
        ],
    ),
    "mlproxy_queue_depth": (
        "gauge",
        "Requests waiting for a run.",
        [
            ("mlproxy_queue_depth", {"model": "cancer", "version": "v1"}, 2),
            ("mlproxy_queue_depth", {"model": "cancer", "version": "v2"}, 0),
        ],
    ),
    "mlproxy_queue_shed": (
        "counter",
        "Requests shed after waiting limits.queue_timeout_ms.",
        [
            ("mlproxy_queue_shed_total", {"model": "cancer", "version": "v1"}, 1),
            ("mlproxy_queue_shed_total", {"model": "cancer", "version": "v2"}, 0),
        ],
    ),
    "mlproxy_mirror_rows": (
        "counter",
        "Shadow rows per mirror version, by outcome.",
        [
            (
                "mlproxy_mirror_rows_total",
                {"model": "cancer", "version": "v2", "outcome": "sent"},
                10,
            ),
            (
                "mlproxy_mirror_rows_total",
                {"model": "cancer", "version": "v2", "outcome": "dropped"},
                2,
            ),
            (
                "mlproxy_mirror_rows_total",
                {"model": "cancer", "version": "v2", "outcome": "yielded"},
                1,
            ),
            (
                "mlproxy_mirror_rows_total",
                {"model": "cancer", "version": "v2", "outcome": "failed"},
                1,
            ),
            (
                "mlproxy_mirror_rows_total",
                {"model": "cancer", "version": "v2", "outcome": "compared"},
                8,
            ),
            (
                "mlproxy_mirror_rows_total",
                {"model": "prices", "version": "r1", "outcome": "sent"},
                3,
            ),
            (
                "mlproxy_mirror_rows_total",
                {"model": "prices", "version": "r1", "outcome": "dropped"},
                0,
            ),
            (
                "mlproxy_mirror_rows_total",
                {"model": "prices", "version": "r1", "outcome": "yielded"},
                0,
            ),
            (
                "mlproxy_mirror_rows_total",
                {"model": "prices", "version": "r1", "outcome": "failed"},
                3,
            ),
            (
                "mlproxy_mirror_rows_total",
                {"model": "prices", "version": "r1", "outcome": "compared"},
                0,
            ),
            (
                "mlproxy_mirror_rows_total",
                {"model": "prices", "version": "r2", "outcome": "sent"},
                0,
            ),
            (
                "mlproxy_mirror_rows_total",
                {"model": "prices", "version": "r2", "outcome": "dropped"},
                4,
            ),
            (
                "mlproxy_mirror_rows_total",
                {"model": "prices", "version": "r2", "outcome": "yielded"},
                0,
            ),
            (
                "mlproxy_mirror_rows_total",
                {"model": "prices", "version": "r2", "outcome": "failed"},
                0,
            ),
            (
                "mlproxy_mirror_rows_total",
                {"model": "prices", "version": "r2", "outcome": "compared"},
                0,
            ),
        ],
    ),
    "mlproxy_shadow_agreement_ratio": (
        "gauge",
        "Share of mirrored rows whose label agreed with the primary.",
        [
            ("mlproxy_shadow_agreement_ratio", {"model": "cancer", "version": "v2"}, 0.75),
        ],
    ),
    "mlproxy_shadow_mean_abs_diff": (
        "gauge",
        "Mean |mirror - primary| over float outputs.",
        [
            ("mlproxy_shadow_mean_abs_diff", {"model": "cancer", "version": "v2"}, 0.125),
        ],
    ),
    "mlproxy_mirror_breaker_opened": (
        "counter",
        "Times a failing mirror was paused.",
        [
            ("mlproxy_mirror_breaker_opened_total", {"model": "cancer", "version": "v2"}, 1),
            ("mlproxy_mirror_breaker_opened_total", {"model": "prices", "version": "r1"}, 0),
            ("mlproxy_mirror_breaker_opened_total", {"model": "prices", "version": "r2"}, 0),
        ],
    ),
    "mlproxy_fallbacks": (
        "counter",
        "Requests a version failed that the stable version answered instead.",
        [
            ("mlproxy_fallbacks_total", {"model": "cancer", "version": "v1"}, 0),
            ("mlproxy_fallbacks_total", {"model": "cancer", "version": "v2"}, 3),
            ("mlproxy_fallbacks_total", {"model": "prices", "version": "r1"}, 1),
            ("mlproxy_fallbacks_total", {"model": "prices", "version": "r2"}, 0),
        ],
    ),
    "mlproxy_version_available": (
        "gauge",
        UPSTREAM_HELP["mlproxy_version_available"],
        [
            ("mlproxy_version_available", {"model": "cancer", "version": "v1"}, 1),
            ("mlproxy_version_available", {"model": "cancer", "version": "v2"}, 1),
            ("mlproxy_version_available", {"model": "prices", "version": "r1"}, 1),
            ("mlproxy_version_available", {"model": "prices", "version": "r2"}, 0),
        ],
    ),
    "mlproxy_upstream_ejections": (
        "counter",
        UPSTREAM_HELP["mlproxy_upstream_ejections"],
        [
            ("mlproxy_upstream_ejections_total", {"model": "prices", "version": "r1"}, 0),
            ("mlproxy_upstream_ejections_total", {"model": "prices", "version": "r2"}, 2),
        ],
    ),
    "mlproxy_upstream_refused_calls": (
        "counter",
        UPSTREAM_HELP["mlproxy_upstream_refused_calls"],
        [
            ("mlproxy_upstream_refused_calls_total", {"model": "prices", "version": "r1"}, 0),
            ("mlproxy_upstream_refused_calls_total", {"model": "prices", "version": "r2"}, 17),
        ],
    ),
    "mlproxy_upstream_retries": (
        "counter",
        UPSTREAM_HELP["mlproxy_upstream_retries"],
        [
            (
                "mlproxy_upstream_retries_total",
                {"model": "prices", "version": "r1", "outcome": "granted"},
                4,
            ),
            (
                "mlproxy_upstream_retries_total",
                {"model": "prices", "version": "r1", "outcome": "denied"},
                1,
            ),
            (
                "mlproxy_upstream_retries_total",
                {"model": "prices", "version": "r2", "outcome": "granted"},
                0,
            ),
            (
                "mlproxy_upstream_retries_total",
                {"model": "prices", "version": "r2", "outcome": "denied"},
                0,
            ),
        ],
    ),
    "mlproxy_inflight_requests": (
        "gauge",
        "Requests being served now.",
        [
            ("mlproxy_inflight_requests", {}, 3),
        ],
    ),
    "mlproxy_shed": (
        "counter",
        "Requests refused with 503 before any work: they waited limits.queue_timeout_ms for an"
        " admission slot, or the waiting queue was full.",
        [
            ("mlproxy_shed_total", {}, 7),
        ],
    ),
    "mlproxy_admission_limit": (
        "gauge",
        "Requests admitted at once now (the adaptive limit, at most limits.max_inflight).",
        [
            ("mlproxy_admission_limit", {}, 64),
        ],
    ),
    "mlproxy_admission_waiting_requests": (
        "gauge",
        "Requests parsed and waiting for an admission slot.",
        [
            ("mlproxy_admission_waiting_requests", {}, 5),
        ],
    ),
    "mlproxy_refused_connections": (
        "counter",
        "Connections answered and closed, or left, without their request served, by reason.",
        [
            ("mlproxy_refused_connections_total", {"reason": "body_timeout"}, 2),
            ("mlproxy_refused_connections_total", {"reason": "malformed_http"}, 1),
        ],
    ),
    "mlproxy_config_reloads": (
        "counter",
        "Config reloads by outcome (error: refused, old config kept).",
        [
            ("mlproxy_config_reloads_total", {"outcome": "ok"}, 4),
            ("mlproxy_config_reloads_total", {"outcome": "error"}, 0),
        ],
    ),
    "mlproxy_config_last_reload_success": (
        "gauge",
        "1 when the config file is what is served; 0 while its last reload stands refused.",
        [
            ("mlproxy_config_last_reload_success", {}, 0),
        ],
    ),
    "mlproxy_rollout_status": (
        "gauge",
        "1 for the state each model's canary rollout is in.",
        [
            ("mlproxy_rollout_status", {"model": "a", "status": "progressing"}, 1),
            ("mlproxy_rollout_status", {"model": "a", "status": "holding"}, 0),
            ("mlproxy_rollout_status", {"model": "a", "status": "promoted"}, 0),
            ("mlproxy_rollout_status", {"model": "a", "status": "rolled_back"}, 0),
            ("mlproxy_rollout_status", {"model": "b", "status": "progressing"}, 0),
            ("mlproxy_rollout_status", {"model": "b", "status": "holding"}, 1),
            ("mlproxy_rollout_status", {"model": "b", "status": "promoted"}, 0),
            ("mlproxy_rollout_status", {"model": "b", "status": "rolled_back"}, 0),
            ("mlproxy_rollout_status", {"model": "c", "status": "progressing"}, 0),
            ("mlproxy_rollout_status", {"model": "c", "status": "holding"}, 0),
            ("mlproxy_rollout_status", {"model": "c", "status": "promoted"}, 1),
            ("mlproxy_rollout_status", {"model": "c", "status": "rolled_back"}, 0),
            ("mlproxy_rollout_status", {"model": "d", "status": "progressing"}, 0),
            ("mlproxy_rollout_status", {"model": "d", "status": "holding"}, 0),
            ("mlproxy_rollout_status", {"model": "d", "status": "promoted"}, 0),
            ("mlproxy_rollout_status", {"model": "d", "status": "rolled_back"}, 1),
        ],
    ),
    "mlproxy_alerts": (
        "counter",
        "Alerts raised since start.",
        [
            ("mlproxy_alerts_total", {}, 9),
        ],
    ),
    "mlproxy_config_loaded_timestamp_seconds": (
        "gauge",
        "When the config in force was loaded (unix time).",
        [
            ("mlproxy_config_loaded_timestamp_seconds", {}, 1700000000.5),
        ],
    ),
}

MONITOR_EXPECTED: dict[str, Family] = {
    "mlproxy_drift_score": (
        "gauge",
        "Drift of a feature or output against the training baseline, per statistic and window.",
        [
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "f0",
                    "statistic": "psi",
                    "window": "short",
                },
                0,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "f0",
                    "statistic": "ks",
                    "window": "short",
                },
                0,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "f0",
                    "statistic": "js",
                    "window": "short",
                },
                0,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "f1",
                    "statistic": "psi",
                    "window": "short",
                },
                0,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "f1",
                    "statistic": "ks",
                    "window": "short",
                },
                0,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "f1",
                    "statistic": "js",
                    "window": "short",
                },
                0,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "label",
                    "statistic": "psi",
                    "window": "short",
                },
                0.2746530721670274,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "label",
                    "statistic": "ks",
                    "window": "short",
                },
                0.25,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "label",
                    "statistic": "js",
                    "window": "short",
                },
                0.22089576884901735,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "f0",
                    "statistic": "psi",
                    "window": "long",
                },
                0,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "f0",
                    "statistic": "ks",
                    "window": "long",
                },
                0,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "f0",
                    "statistic": "js",
                    "window": "long",
                },
                0,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "f1",
                    "statistic": "psi",
                    "window": "long",
                },
                7.730822229653267,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "f1",
                    "statistic": "ks",
                    "window": "long",
                },
                0.75,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "f1",
                    "statistic": "js",
                    "window": "long",
                },
                0.740806952380577,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "label",
                    "statistic": "psi",
                    "window": "long",
                },
                0,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "label",
                    "statistic": "ks",
                    "window": "long",
                },
                0,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "cancer",
                    "version": "v1",
                    "feature": "label",
                    "statistic": "js",
                    "window": "long",
                },
                0,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "prices",
                    "version": "r1",
                    "feature": "x",
                    "statistic": "psi",
                    "window": "long",
                },
                0,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "prices",
                    "version": "r1",
                    "feature": "x",
                    "statistic": "ks",
                    "window": "long",
                },
                0,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "prices",
                    "version": "r1",
                    "feature": "x",
                    "statistic": "js",
                    "window": "long",
                },
                0,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "prices",
                    "version": "r1",
                    "feature": "variable",
                    "statistic": "psi",
                    "window": "long",
                },
                4.60431846666895,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "prices",
                    "version": "r1",
                    "feature": "variable",
                    "statistic": "ks",
                    "window": "long",
                },
                0.5,
            ),
            (
                "mlproxy_drift_score",
                {
                    "model": "prices",
                    "version": "r1",
                    "feature": "variable",
                    "statistic": "js",
                    "window": "long",
                },
                0.5579230452841438,
            ),
        ],
    ),
    "mlproxy_drift_level": (
        "gauge",
        "Drift level of a feature or output: 0 ok, 1 warn, 2 alert.",
        [
            ("mlproxy_drift_level", {"model": "cancer", "version": "v1", "feature": "f0"}, 0),
            ("mlproxy_drift_level", {"model": "cancer", "version": "v1", "feature": "f1"}, 2),
            ("mlproxy_drift_level", {"model": "cancer", "version": "v1", "feature": "label"}, 1),
            ("mlproxy_drift_level", {"model": "prices", "version": "r1", "feature": "x"}, 1),
            ("mlproxy_drift_level", {"model": "prices", "version": "r1", "feature": "variable"}, 0),
        ],
    ),
    "mlproxy_output_chi2_pvalue": (
        "gauge",
        "Chi-square p-value of predicted class counts against baseline.",
        [
            (
                "mlproxy_output_chi2_pvalue",
                {"model": "cancer", "version": "v1", "window": "long"},
                0.31731050786291115,
            ),
        ],
    ),
    "mlproxy_input_out_of_range_ratio": (
        "gauge",
        "Input values outside the training range (recent window).",
        [
            ("mlproxy_input_out_of_range_ratio", {"model": "cancer", "version": "v1"}, 0.125),
        ],
    ),
    "mlproxy_input_duplicate_ratio": (
        "gauge",
        "Input rows repeating a recent row (recent window).",
        [
            ("mlproxy_input_duplicate_ratio", {"model": "cancer", "version": "v1"}, 0.5),
        ],
    ),
    "mlproxy_accuracy_ratio": (
        "gauge",
        "Accuracy on fed-back ground truth, per window.",
        [
            (
                "mlproxy_accuracy_ratio",
                {"model": "cancer", "version": "v1", "window": "short"},
                0.75,
            ),
            (
                "mlproxy_accuracy_ratio",
                {"model": "cancer", "version": "v1", "window": "long"},
                0.875,
            ),
        ],
    ),
    "mlproxy_holdout_accuracy_ratio": (
        "gauge",
        "Holdout accuracy from the version's manifest.",
        [
            ("mlproxy_holdout_accuracy_ratio", {"model": "cancer", "version": "v1"}, 0.9),
        ],
    ),
    "mlproxy_mae": (
        "gauge",
        "Mean absolute error on fed-back true values (regression models), per window.",
        [
            ("mlproxy_mae", {"model": "prices", "version": "r1", "window": "long"}, 1.5),
        ],
    ),
    "mlproxy_holdout_mae": (
        "gauge",
        "Holdout mean absolute error from the version's manifest (regression models).",
        [
            ("mlproxy_holdout_mae", {"model": "prices", "version": "r1"}, 0.25),
        ],
    ),
    "mlproxy_queue_wait_seconds": (
        "histogram",
        "How long a batch's first request waited for its run.",
        [
            *_histogram(
                "mlproxy_queue_wait_seconds",
                {"model": "cancer", "version": "v1"},
                LE,
                [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2],
                0.0101,
            ),
        ],
    ),
    "mlproxy_batch_size_rows": (
        "histogram",
        "Rows per onnxruntime run.",
        [
            *_histogram(
                "mlproxy_batch_size_rows",
                {"model": "cancer", "version": "v1"},
                ("1", "2", "4", "8", "16", "32", "64", "128", "256", "+Inf"),
                [3, 3, 5, 5, 5, 5, 5, 6, 6, 7],
                411,
            ),
        ],
    ),
    "mlproxy_event_loop_lag_seconds": (
        "gauge",
        "How late the event loop ran a 250 ms timer.",
        [
            ("mlproxy_event_loop_lag_seconds", {}, 0.0125),
        ],
    ),
    "mlproxy_event_loop_busy_ratio": (
        "gauge",
        "CPU time of the serving loop's thread over wall time, last 250 ms (1 = one full CPU).",
        [
            ("mlproxy_event_loop_busy_ratio", {}, 0.25),
        ],
    ),
    "mlproxy_input_nonfinite": (
        "counter",
        "Requests refused for NaN or infinite input values.",
        [
            ("mlproxy_input_nonfinite_total", {"model": "cancer"}, 2),
            ("mlproxy_input_nonfinite_total", {"model": "prices"}, 0),
        ],
    ),
    "mlproxy_feedback": (
        "counter",
        "Ground-truth labels received, by outcome.",
        [
            ("mlproxy_feedback_total", {"model": "cancer", "outcome": "ok"}, 5),
            ("mlproxy_feedback_total", {"model": "cancer", "outcome": "unknown_id"}, 1),
            ("mlproxy_feedback_total", {"model": "prices", "outcome": "ok"}, 2),
        ],
    ),
    "mlproxy_webhook_deliveries": (
        "counter",
        "Alert webhook deliveries by outcome.",
        [
            ("mlproxy_webhook_deliveries_total", {"outcome": "ok"}, 2),
            ("mlproxy_webhook_deliveries_total", {"outcome": "failed"}, 0),
            ("mlproxy_webhook_deliveries_total", {"outcome": "dropped"}, 1),
        ],
    ),
    "mlproxy_alerts_open": (
        "gauge",
        "Alerts firing now, by kind.",
        [
            ("mlproxy_alerts_open", {"kind": "drift"}, 2),
            ("mlproxy_alerts_open", {"kind": "concept_drift"}, 1),
            ("mlproxy_alerts_open", {"kind": "overload"}, 1),
            ("mlproxy_alerts_open", {"kind": "duplicate_inputs"}, 3),
            ("mlproxy_alerts_open", {"kind": "canary_rollback"}, 1),
        ],
    ),
}

EMPTY_PROXY_EXPECTED: dict[str, Family] = {
    "mlproxy_requests": (
        "counter",
        "Inference requests answered by a version, by outcome.",
        [],
    ),
    "mlproxy_rows": (
        "counter",
        "Input rows inferred by a version as primary.",
        [],
    ),
    "mlproxy_request_duration_seconds": (
        "histogram",
        "Time from decoded request to encoded answer, per version that answered.",
        [],
    ),
    "mlproxy_traffic_weight_ratio": (
        "gauge",
        "Share of routed traffic a version gets now (0..1).",
        [],
    ),
    "mlproxy_batches": (
        "counter",
        "onnxruntime runs (micro-batches).",
        [],
    ),
    "mlproxy_batch_rows": (
        "counter",
        "Rows in those runs.",
        [],
    ),
    "mlproxy_queue_depth": (
        "gauge",
        "Requests waiting for a run.",
        [],
    ),
    "mlproxy_queue_shed": (
        "counter",
        "Requests shed after waiting limits.queue_timeout_ms.",
        [],
    ),
    "mlproxy_mirror_rows": (
        "counter",
        "Shadow rows per mirror version, by outcome.",
        [],
    ),
    "mlproxy_shadow_agreement_ratio": (
        "gauge",
        "Share of mirrored rows whose label agreed with the primary.",
        [],
    ),
    "mlproxy_shadow_mean_abs_diff": (
        "gauge",
        "Mean |mirror - primary| over float outputs.",
        [],
    ),
    "mlproxy_mirror_breaker_opened": (
        "counter",
        "Times a failing mirror was paused.",
        [],
    ),
    "mlproxy_fallbacks": (
        "counter",
        "Requests a version failed that the stable version answered instead.",
        [],
    ),
    **UPSTREAM_EMPTY,
    "mlproxy_inflight_requests": (
        "gauge",
        "Requests being served now.",
        [
            ("mlproxy_inflight_requests", {}, 0),
        ],
    ),
    "mlproxy_shed": (
        "counter",
        "Requests refused with 503 before any work: they waited limits.queue_timeout_ms for an"
        " admission slot, or the waiting queue was full.",
        [
            ("mlproxy_shed_total", {}, 0),
        ],
    ),
    "mlproxy_admission_limit": (
        "gauge",
        "Requests admitted at once now (the adaptive limit, at most limits.max_inflight).",
        [
            ("mlproxy_admission_limit", {}, 0),
        ],
    ),
    "mlproxy_admission_waiting_requests": (
        "gauge",
        "Requests parsed and waiting for an admission slot.",
        [
            ("mlproxy_admission_waiting_requests", {}, 0),
        ],
    ),
    "mlproxy_refused_connections": (
        "counter",
        "Connections answered and closed, or left, without their request served, by reason.",
        [],
    ),
    "mlproxy_config_reloads": (
        "counter",
        "Config reloads by outcome (error: refused, old config kept).",
        [
            ("mlproxy_config_reloads_total", {"outcome": "ok"}, 0),
            ("mlproxy_config_reloads_total", {"outcome": "error"}, 0),
        ],
    ),
    "mlproxy_config_last_reload_success": (
        "gauge",
        "1 when the config file is what is served; 0 while its last reload stands refused.",
        [
            ("mlproxy_config_last_reload_success", {}, 1),
        ],
    ),
    "mlproxy_rollout_status": (
        "gauge",
        "1 for the state each model's canary rollout is in.",
        [],
    ),
    "mlproxy_alerts": (
        "counter",
        "Alerts raised since start.",
        [
            ("mlproxy_alerts_total", {}, 0),
        ],
    ),
    "mlproxy_config_loaded_timestamp_seconds": (
        "gauge",
        "When the config in force was loaded (unix time).",
        [
            ("mlproxy_config_loaded_timestamp_seconds", {}, 0),
        ],
    ),
}

EMPTY_MONITOR_EXPECTED: dict[str, Family] = {
    "mlproxy_drift_score": (
        "gauge",
        "Drift of a feature or output against the training baseline, per statistic and window.",
        [],
    ),
    "mlproxy_drift_level": (
        "gauge",
        "Drift level of a feature or output: 0 ok, 1 warn, 2 alert.",
        [],
    ),
    "mlproxy_output_chi2_pvalue": (
        "gauge",
        "Chi-square p-value of predicted class counts against baseline.",
        [],
    ),
    "mlproxy_input_out_of_range_ratio": (
        "gauge",
        "Input values outside the training range (recent window).",
        [],
    ),
    "mlproxy_input_duplicate_ratio": (
        "gauge",
        "Input rows repeating a recent row (recent window).",
        [],
    ),
    "mlproxy_accuracy_ratio": (
        "gauge",
        "Accuracy on fed-back ground truth, per window.",
        [],
    ),
    "mlproxy_holdout_accuracy_ratio": (
        "gauge",
        "Holdout accuracy from the version's manifest.",
        [],
    ),
    "mlproxy_mae": (
        "gauge",
        "Mean absolute error on fed-back true values (regression models), per window.",
        [],
    ),
    "mlproxy_holdout_mae": (
        "gauge",
        "Holdout mean absolute error from the version's manifest (regression models).",
        [],
    ),
    "mlproxy_queue_wait_seconds": (
        "histogram",
        "How long a batch's first request waited for its run.",
        [],
    ),
    "mlproxy_batch_size_rows": (
        "histogram",
        "Rows per onnxruntime run.",
        [],
    ),
    "mlproxy_event_loop_lag_seconds": (
        "gauge",
        "How late the event loop ran a 250 ms timer.",
        [
            ("mlproxy_event_loop_lag_seconds", {}, 0),
        ],
    ),
    "mlproxy_event_loop_busy_ratio": (
        "gauge",
        "CPU time of the serving loop's thread over wall time, last 250 ms (1 = one full CPU).",
        [
            ("mlproxy_event_loop_busy_ratio", {}, 0),
        ],
    ),
    "mlproxy_input_nonfinite": (
        "counter",
        "Requests refused for NaN or infinite input values.",
        [],
    ),
    "mlproxy_feedback": (
        "counter",
        "Ground-truth labels received, by outcome.",
        [],
    ),
    "mlproxy_webhook_deliveries": (
        "counter",
        "Alert webhook deliveries by outcome.",
        [
            ("mlproxy_webhook_deliveries_total", {"outcome": "ok"}, 0),
            ("mlproxy_webhook_deliveries_total", {"outcome": "failed"}, 0),
            ("mlproxy_webhook_deliveries_total", {"outcome": "dropped"}, 0),
        ],
    ),
    "mlproxy_alerts_open": (
        "gauge",
        "Alerts firing now, by kind.",
        [
            ("mlproxy_alerts_open", {"kind": "drift"}, 0),
            ("mlproxy_alerts_open", {"kind": "concept_drift"}, 0),
            ("mlproxy_alerts_open", {"kind": "overload"}, 0),
            ("mlproxy_alerts_open", {"kind": "duplicate_inputs"}, 0),
            ("mlproxy_alerts_open", {"kind": "canary_rollback"}, 0),
        ],
    ),
}


def families(registry: CollectorRegistry) -> dict[str, Family]:
    return {
        f.name: (f.type, f.documentation, [(s.name, dict(s.labels), s.value) for s in f.samples])
        for f in registry.collect()
    }


def assert_families(got: dict[str, Family], expected: dict[str, Family]) -> None:
    """The same families with the same type, help and samples (in order); values to 1e-12."""
    assert sorted(got) == sorted(expected)
    for name, (kind, doc, samples) in expected.items():
        g_kind, g_doc, g_samples = got[name]
        assert (g_kind, g_doc) == (kind, doc), name
        assert [(s[0], s[1]) for s in g_samples] == [(s[0], s[1]) for s in samples], name
        assert [s[2] for s in g_samples] == pytest.approx([s[2] for s in samples], rel=1e-12), name


def registry_of(collector: ProxyCollector | MonitorCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def test_proxy_collector_renders_every_sample() -> None:
    registry = registry_of(ProxyCollector(proxy_snapshot))
    assert_families(families(registry), PROXY_EXPECTED)


def test_monitor_collector_renders_every_sample() -> None:
    registry = registry_of(MonitorCollector(monitor_snapshot))
    assert_families(families(registry), MONITOR_EXPECTED)


def test_rendered_text_parses_to_the_same_samples() -> None:
    """What a scrape reads (the text format) holds exactly the collected samples."""
    for collector in (ProxyCollector(proxy_snapshot), MonitorCollector(monitor_snapshot)):
        registry = registry_of(collector)
        parsed = {
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for f in text_string_to_metric_families(render(registry).decode())
            for s in f.samples
        }
        collected = {
            (s[0], tuple(sorted(s[1].items())), s[2])
            for _, _, samples in families(registry).values()
            for s in samples
        }
        assert parsed == collected


def test_empty_snapshots_render_empty_families_and_zeros() -> None:
    empty = Snapshot(versions=[], inflight=0, shed=0, config_loaded_at=0.0)
    got = families(registry_of(ProxyCollector(lambda: empty)))
    assert_families(got, EMPTY_PROXY_EXPECTED)
    quiet = MonitorSnapshot(
        versions=[],
        loop_lag_s=0.0,
        loop_busy=0.0,
        nonfinite={},
        feedback={},
        webhook={},
        open_alerts={},
    )
    got = families(registry_of(MonitorCollector(lambda: quiet)))
    assert_families(got, EMPTY_MONITOR_EXPECTED)
