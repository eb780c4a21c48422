"""Prometheus export: a collector that reads the live counters at scrape time (no per-request cost)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.engine.stats import LatencyHistogram
from proxy.http.snapshots import MonitorSnapshot, MonitorView, Snapshot, VersionView
from proxy.models.backends import BackendKind
from proxy.monitoring.alerts import AlertKind
from proxy.routing.rollout import RolloutStatus

Registry = CollectorRegistry
S = TypeVar("S")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MV = ("model", "version")  # the labels of every per-version family
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # rows per run


class _SnapshotCollector(Collector, Generic[S]):
    """A collector that reads one snapshot of live state per scrape (no per-request cost)."""

    def __init__(self, snapshot: Callable[[], S]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # families depend on what is served: nothing to pre-declare


class ProxyCollector(_SnapshotCollector[Snapshot]):
    """Traffic, latency, batching, shadow, rollouts and reloads."""

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from _traffic(snap.versions)
        yield from _batching(snap.versions)
        yield from _shadow(snap.versions)
        yield _fallbacks(snap.versions)
        yield from _upstreams(snap.versions)
        yield from _admission(snap)
        yield from _config_and_rollouts(snap)


def _traffic(versions: list[VersionView]) -> Iterator[Metric]:
    """Requests by outcome, rows, latency and traffic weight, per version."""
    requests = CounterMetricFamily(
        "mlproxy_requests",
        "Inference requests answered by a version, by outcome.",
        labels=[*MV, "outcome"],
    )
    rows = CounterMetricFamily(
        "mlproxy_rows", "Input rows inferred by a version as primary.", labels=MV
    )
    latency = HistogramMetricFamily(
        "mlproxy_request_duration_seconds",
        "Time from decoded request to encoded answer, per version that answered.",
        labels=MV,
    )
    weight = GaugeMetricFamily(
        "mlproxy_traffic_weight_ratio",
        "Share of routed traffic a version gets now (0..1).",
        labels=MV,
    )
    for v in versions:
        lv = [v.model, v.version]
        st = v.stats
        requests.add_metric([*lv, "ok"], st.requests - st.errors)
        requests.add_metric([*lv, "error"], st.errors)
        rows.add_metric(lv, st.rows)
        latency.add_metric(lv, _buckets(st.latency), st.latency.sum)
        weight.add_metric(lv, v.weight)
    yield from (requests, rows, latency, weight)


def _batching(versions: list[VersionView]) -> Iterator[Metric]:
    """Runs, rows, queue depth and queue sheds of the versions onnxruntime runs here."""
    batches = CounterMetricFamily("mlproxy_batches", "onnxruntime runs (micro-batches).", labels=MV)
    batch_rows = CounterMetricFamily("mlproxy_batch_rows", "Rows in those runs.", labels=MV)
    queue = GaugeMetricFamily("mlproxy_queue_depth", "Requests waiting for a run.", labels=MV)
    shed = CounterMetricFamily(
        "mlproxy_queue_shed", "Requests shed after waiting limits.queue_timeout_ms.", labels=MV
    )
    for v in versions:
        if v.kind == BackendKind.ONNX:
            lv = [v.model, v.version]
            batches.add_metric(lv, v.batches)
            batch_rows.add_metric(lv, v.batch_rows)
            queue.add_metric(lv, v.queue_depth)
            shed.add_metric(lv, v.shed)
    yield from (batches, batch_rows, queue, shed)


def _shadow(versions: list[VersionView]) -> Iterator[Metric]:
    """Mirror rows by outcome, agreement, mean |diff| and breaker openings, per mirror version."""
    mirror = CounterMetricFamily(
        "mlproxy_mirror_rows",
        "Shadow rows per mirror version, by outcome.",
        labels=[*MV, "outcome"],
    )
    agreement = GaugeMetricFamily(
        "mlproxy_shadow_agreement_ratio",
        "Share of mirrored rows whose label agreed with the primary.",
        labels=MV,
    )
    diff = GaugeMetricFamily(
        "mlproxy_shadow_mean_abs_diff", "Mean |mirror - primary| over float outputs.", labels=MV
    )
    breaker = CounterMetricFamily(
        "mlproxy_mirror_breaker_opened", "Times a failing mirror was paused.", labels=MV
    )
    for v in versions:
        m = v.stats.mirror
        if not (m.sent or m.dropped or m.yielded):
            continue  # not a mirror (or not mirrored to yet)
        lv = [v.model, v.version]
        for outcome, count in (
            ("sent", m.sent),
            ("dropped", m.dropped),
            ("yielded", m.yielded),
            ("failed", m.failed),
            ("compared", m.compared),
        ):
            mirror.add_metric([*lv, outcome], count)
        breaker.add_metric(lv, m.breaker_opened)
        a, d = m.agreement(), m.mean_abs_diff()
        if a is not None:
            agreement.add_metric(lv, a)
        if d is not None:
            diff.add_metric(lv, d)
    yield from (mirror, agreement, diff, breaker)


def _fallbacks(versions: list[VersionView]) -> Metric:
    fallbacks = CounterMetricFamily(
        "mlproxy_fallbacks",
        "Requests a version failed that the stable version answered instead.",
        labels=MV,
    )
    for v in versions:
        fallbacks.add_metric([v.model, v.version], v.fallbacks)
    return fallbacks


def _upstreams(versions: list[VersionView]) -> Iterator[Metric]:
    """Whether each version can take traffic, and each remote one's breaker and retries."""
    available = GaugeMetricFamily(
        "mlproxy_version_available",
        "1 when the version can take traffic; 0 while a remote one is unavailable (its metadata"
        " not answered) or ejected by its circuit breaker.",
        labels=MV,
    )
    ejections = CounterMetricFamily(
        "mlproxy_upstream_ejections",
        "Times a remote version's circuit breaker opened after failed calls in a row.",
        labels=MV,
    )
    refused = CounterMetricFamily(
        "mlproxy_upstream_refused_calls",
        "Calls to a remote version refused at once, the upstream not called (unavailable or"
        " ejected); the request fell back to stable or was answered 503.",
        labels=MV,
    )
    retries = CounterMetricFamily(
        "mlproxy_upstream_retries",
        "Retries after a failed connection to a remote version: granted, or denied by the retry"
        " budget.",
        labels=[*MV, "outcome"],
    )
    for v in versions:
        lv = [v.model, v.version]
        available.add_metric(lv, 1.0 if v.available else 0.0)
        h = v.upstream
        if h is None:
            continue
        ejections.add_metric(lv, h.breaker_opened)
        refused.add_metric(lv, h.ejected)
        retries.add_metric([*lv, "granted"], h.retries)
        retries.add_metric([*lv, "denied"], h.retries_denied)
    yield from (available, ejections, refused, retries)


def _admission(snap: Snapshot) -> Iterator[Metric]:
    """Requests in flight, and those refused at the door."""
    yield GaugeMetricFamily(
        "mlproxy_inflight_requests", "Requests being served now.", value=snap.inflight
    )
    yield CounterMetricFamily(
        "mlproxy_shed",
        "Requests refused with 503 before any work: they waited limits.queue_timeout_ms for an"
        " admission slot, or the waiting queue was full.",
        value=snap.shed,
    )
    yield GaugeMetricFamily(
        "mlproxy_admission_limit",
        "Requests admitted at once now (the adaptive limit, at most limits.max_inflight).",
        value=snap.admission_limit,
    )
    yield GaugeMetricFamily(
        "mlproxy_admission_waiting_requests",
        "Requests parsed and waiting for an admission slot.",
        value=snap.admission_waiting,
    )
    refused = CounterMetricFamily(
        "mlproxy_refused_connections",
        "Connections answered and closed, or left, without their request served, by reason.",
        labels=["reason"],
    )
    for reason, n in sorted(snap.refused.items()):
        refused.add_metric([reason], n)
    yield refused


def _config_and_rollouts(snap: Snapshot) -> Iterator[Metric]:
    """Config reloads and their standing, each model's rollout status, alerts raised."""
    reloads = CounterMetricFamily(
        "mlproxy_config_reloads",
        "Config reloads by outcome (error: refused, old config kept).",
        labels=["outcome"],
    )
    for outcome in ("ok", "error"):
        reloads.add_metric([outcome], snap.reloads.get(outcome, 0))
    yield reloads
    yield GaugeMetricFamily(
        "mlproxy_config_last_reload_success",
        "1 when the config file is what is served; 0 while its last reload stands refused.",
        value=1.0 if snap.config_ok else 0.0,
    )
    rollout = GaugeMetricFamily(
        "mlproxy_rollout_status",
        "1 for the state each model's canary rollout is in.",
        labels=["model", "status"],
    )
    for model, current in snap.rollouts.items():
        for status in RolloutStatus:
            rollout.add_metric([model, status.value], 1.0 if current == status else 0.0)
    yield rollout
    yield CounterMetricFamily("mlproxy_alerts", "Alerts raised since start.", value=snap.alerts)
    yield GaugeMetricFamily(
        "mlproxy_config_loaded_timestamp_seconds",
        "When the config in force was loaded (unix time).",
        value=snap.config_loaded_at,
    )


def _buckets(h: LatencyHistogram) -> list[tuple[str, float]]:
    """A latency histogram's cumulative buckets, as Prometheus `le` bounds."""
    return [(_le(b), c) for b, c in h.cumulative_export()]


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:.6g}"


def create_registry(
    snapshot: Callable[[], Snapshot], monitor: Callable[[], MonitorSnapshot] | None = None
) -> CollectorRegistry:
    """A fresh registry holding the proxy's collectors (and process RSS/CPU)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(snapshot))
    if monitor is not None:
        registry.register(MonitorCollector(monitor))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    data: bytes = generate_latest(registry)
    return data


class MonitorCollector(_SnapshotCollector[MonitorSnapshot]):
    """Drift scores, input anomalies, accuracy, queue waits, loop lag and alerts."""

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from _drift(snap.versions)
        yield from _input_anomalies(snap.versions)
        yield from _accuracy(snap.versions)
        yield from _queue(snap.versions)
        yield from _event_loop(snap)
        yield from _inputs_and_feedback(snap)
        yield from _webhooks_and_alerts(snap)


def _drift(versions: list[MonitorView]) -> Iterator[Metric]:
    """Per judged window: every distribution's scores and the class counts' chi-square p-value;
    and each feature's or output's drift level."""
    score = GaugeMetricFamily(
        "mlproxy_drift_score",
        "Drift of a feature or output against the training baseline, per statistic and window.",
        labels=[*MV, "feature", "statistic", "window"],
    )
    level = GaugeMetricFamily(
        "mlproxy_drift_level",
        "Drift level of a feature or output: 0 ok, 1 warn, 2 alert.",
        labels=[*MV, "feature"],
    )
    chi2 = GaugeMetricFamily(
        "mlproxy_output_chi2_pvalue",
        "Chi-square p-value of predicted class counts against baseline.",
        labels=[*MV, "window"],
    )
    for v in versions:
        lv = [v.model, v.version]
        for window, j in (("short", v.short), ("long", v.long)):
            if j is None:
                continue
            for i, name in enumerate(v.names):
                for stat, arr in (("psi", j.psi), ("ks", j.ks), ("js", j.js)):
                    score.add_metric([*lv, name, stat, window], float(arr[i]))
            if j.chi2_p is not None:
                chi2.add_metric([*lv, window], j.chi2_p)
        for name, lvl in v.levels.items():
            level.add_metric([*lv, name], lvl)
    yield from (score, level, chi2)


def _input_anomalies(versions: list[MonitorView]) -> Iterator[Metric]:
    """Out-of-range values and duplicate rows in the recent window."""
    oor = GaugeMetricFamily(
        "mlproxy_input_out_of_range_ratio",
        "Input values outside the training range (recent window).",
        labels=MV,
    )
    dup = GaugeMetricFamily(
        "mlproxy_input_duplicate_ratio",
        "Input rows repeating a recent row (recent window).",
        labels=MV,
    )
    for v in versions:
        lv = [v.model, v.version]
        if v.out_of_range is not None:
            oor.add_metric(lv, v.out_of_range)
        if v.duplicates is not None:
            dup.add_metric(lv, v.duplicates)
    yield from (oor, dup)


def _accuracy(versions: list[MonitorView]) -> Iterator[Metric]:
    """Live accuracy (classification) or MAE (regression) per window, and the manifest's holdout."""
    acc = GaugeMetricFamily(
        "mlproxy_accuracy_ratio",
        "Accuracy on fed-back ground truth, per window.",
        labels=[*MV, "window"],
    )
    holdout = GaugeMetricFamily(
        "mlproxy_holdout_accuracy_ratio",
        "Holdout accuracy from the version's manifest.",
        labels=MV,
    )
    mae = GaugeMetricFamily(
        "mlproxy_mae",
        "Mean absolute error on fed-back true values (regression models), per window.",
        labels=[*MV, "window"],
    )
    holdout_mae = GaugeMetricFamily(
        "mlproxy_holdout_mae",
        "Holdout mean absolute error from the version's manifest (regression models).",
        labels=MV,
    )
    for v in versions:
        lv = [v.model, v.version]
        for window, a in (("short", v.accuracy_short), ("long", v.accuracy_long)):
            if a is not None:
                acc.add_metric([*lv, window], a)
        if v.holdout_accuracy is not None:
            holdout.add_metric(lv, v.holdout_accuracy)
        for window, e in (("short", v.mae_short), ("long", v.mae_long)):
            if e is not None:
                mae.add_metric([*lv, window], e)
        if v.holdout_mae is not None:
            holdout_mae.add_metric(lv, v.holdout_mae)
    yield from (acc, holdout, mae, holdout_mae)


def _queue(versions: list[MonitorView]) -> Iterator[Metric]:
    """Queue waits and rows per run, of the versions that batch."""
    wait = HistogramMetricFamily(
        "mlproxy_queue_wait_seconds",
        "How long a batch's first request waited for its run.",
        labels=MV,
    )
    rows = HistogramMetricFamily("mlproxy_batch_size_rows", "Rows per onnxruntime run.", labels=MV)
    for v in versions:
        lv = [v.model, v.version]
        if v.queue_wait is not None:
            wait.add_metric(lv, _buckets(v.queue_wait), v.queue_wait.sum)
        if v.batch_rows:
            total_rows = float(sum(r * c for r, c in v.batch_rows.items()))
            rows.add_metric(lv, _batch_buckets(v.batch_rows), total_rows)
    yield from (wait, rows)


def _batch_buckets(batch_rows: dict[int, int]) -> list[tuple[str, float]]:
    """Runs by rows per run -> cumulative counts at BATCH_BUCKETS, then +Inf."""
    out: list[tuple[str, float]] = [
        (str(b), sum(c for r, c in batch_rows.items() if r <= b)) for b in BATCH_BUCKETS
    ]
    out.append(("+Inf", sum(batch_rows.values())))
    return out


def _event_loop(snap: MonitorSnapshot) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "mlproxy_event_loop_lag_seconds",
        "How late the event loop ran a 250 ms timer.",
        value=snap.loop_lag_s,
    )
    yield GaugeMetricFamily(
        "mlproxy_event_loop_busy_ratio",
        "CPU time of the serving loop's thread over wall time, last 250 ms (1 = one full CPU).",
        value=snap.loop_busy,
    )


def _inputs_and_feedback(snap: MonitorSnapshot) -> Iterator[Metric]:
    """Requests refused for non-finite inputs, and ground truth received, per model."""
    nonfinite = CounterMetricFamily(
        "mlproxy_input_nonfinite",
        "Requests refused for NaN or infinite input values.",
        labels=["model"],
    )
    for model, n in snap.nonfinite.items():
        nonfinite.add_metric([model], n)
    yield nonfinite
    feedback = CounterMetricFamily(
        "mlproxy_feedback",
        "Ground-truth labels received, by outcome.",
        labels=["model", "outcome"],
    )
    for (model, outcome), n in snap.feedback.items():
        feedback.add_metric([model, outcome], n)
    yield feedback


def _webhooks_and_alerts(snap: MonitorSnapshot) -> Iterator[Metric]:
    """Webhook deliveries by outcome, and alerts firing now by kind (every kind, 0 included)."""
    hooks = CounterMetricFamily(
        "mlproxy_webhook_deliveries", "Alert webhook deliveries by outcome.", labels=["outcome"]
    )
    for outcome in ("ok", "failed", "dropped"):
        hooks.add_metric([outcome], snap.webhook.get(outcome, 0))
    yield hooks
    opened = GaugeMetricFamily(
        "mlproxy_alerts_open", "Alerts firing now, by kind.", labels=["kind"]
    )
    for kind in AlertKind:
        opened.add_metric([kind.value], snap.open_alerts.get(kind, 0))
    yield opened
