"""Prometheus export: the registry, and the proxy's collector (traffic, batching, shadow,
upstreams, admission, config and rollouts) read at scrape time (no per-request cost); the
monitoring one is in `http/monitor_metrics.py`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from proxy.http.collectors import MV, SnapshotCollector, buckets
from proxy.http.monitor_metrics import MonitorCollector
from proxy.http.snapshots import MonitorSnapshot, Snapshot, VersionView
from proxy.models.backends import BackendKind
from proxy.routing.rollout import RolloutStatus

Registry = CollectorRegistry
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ProxyCollector(SnapshotCollector[Snapshot]):
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
        latency.add_metric(lv, buckets(st.latency), st.latency.sum)
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
