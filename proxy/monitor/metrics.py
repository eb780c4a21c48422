"""Prometheus export: a collector that reads the live counters at scrape time (no per-request cost)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .stats import VersionStats

Registry = CollectorRegistry
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class VersionView:
    """One served version as the exporter sees it."""

    model: str
    version: str
    kind: str
    weight: float
    stats: VersionStats
    batches: int = 0
    batch_rows: int = 0
    queue_depth: int = 0
    shed: int = 0
    fallbacks: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything exported, read at scrape time."""

    versions: list[VersionView]
    inflight: int
    shed: int
    config_loaded_at: float
    reloads: dict[str, int] = field(default_factory=dict)
    rollouts: dict[str, str] = field(default_factory=dict)
    alerts: int = 0


class ProxyCollector(Collector):
    """Turns a Snapshot into metric families."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        mv = ["model", "version"]
        requests = CounterMetricFamily(
            "mlproxy_requests",
            "Inference requests answered by a version, by outcome.",
            labels=[*mv, "outcome"],
        )
        rows = CounterMetricFamily(
            "mlproxy_rows", "Input rows inferred by a version as primary.", labels=mv
        )
        latency = HistogramMetricFamily(
            "mlproxy_request_duration_seconds",
            "Time from decoded request to encoded answer, per version that answered.",
            labels=mv,
        )
        weight = GaugeMetricFamily(
            "mlproxy_traffic_weight_ratio",
            "Share of routed traffic a version gets now (0..1).",
            labels=mv,
        )
        batches = CounterMetricFamily(
            "mlproxy_batches", "onnxruntime runs (micro-batches).", labels=mv
        )
        batch_rows = CounterMetricFamily("mlproxy_batch_rows", "Rows in those runs.", labels=mv)
        queue = GaugeMetricFamily("mlproxy_queue_depth", "Requests waiting for a run.", labels=mv)
        shed_q = CounterMetricFamily(
            "mlproxy_queue_shed", "Requests shed after waiting limits.queue_timeout_ms.", labels=mv
        )
        mirror = CounterMetricFamily(
            "mlproxy_mirror_rows",
            "Shadow rows per mirror version, by outcome.",
            labels=[*mv, "outcome"],
        )
        agreement = GaugeMetricFamily(
            "mlproxy_shadow_agreement_ratio",
            "Share of mirrored rows whose label agreed with the primary.",
            labels=mv,
        )
        diff = GaugeMetricFamily(
            "mlproxy_shadow_mean_abs_diff", "Mean |mirror - primary| over float outputs.", labels=mv
        )
        fallbacks = CounterMetricFamily(
            "mlproxy_fallbacks",
            "Requests a version failed that the stable version answered instead.",
            labels=mv,
        )
        breaker = CounterMetricFamily(
            "mlproxy_mirror_breaker_opened", "Times a failing mirror was paused.", labels=mv
        )
        for v in snap.versions:
            lv = [v.model, v.version]
            st = v.stats
            requests.add_metric([*lv, "ok"], st.requests - st.errors)
            requests.add_metric([*lv, "error"], st.errors)
            rows.add_metric(lv, st.rows)
            buckets = [(_le(b), c) for b, c in st.latency.cumulative_export()]
            latency.add_metric(lv, buckets, st.latency.sum)
            weight.add_metric(lv, v.weight)
            if v.kind == "onnx":
                batches.add_metric(lv, v.batches)
                batch_rows.add_metric(lv, v.batch_rows)
                queue.add_metric(lv, v.queue_depth)
                shed_q.add_metric(lv, v.shed)
            fallbacks.add_metric(lv, v.fallbacks)
            m = st.mirror
            if m.sent or m.dropped:
                for outcome, count in (
                    ("sent", m.sent),
                    ("dropped", m.dropped),
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
        yield from (
            requests,
            rows,
            latency,
            weight,
            batches,
            batch_rows,
            queue,
            shed_q,
            mirror,
            agreement,
            diff,
            breaker,
            fallbacks,
        )
        yield GaugeMetricFamily(
            "mlproxy_inflight_requests", "Requests being served now.", value=snap.inflight
        )
        yield CounterMetricFamily(
            "mlproxy_shed",
            "Requests refused at once because limits.max_inflight was reached.",
            value=snap.shed,
        )
        reloads = CounterMetricFamily(
            "mlproxy_config_reloads",
            "Config reloads by outcome (error: refused, old config kept).",
            labels=["outcome"],
        )
        for outcome in ("ok", "error"):
            reloads.add_metric([outcome], snap.reloads.get(outcome, 0))
        yield reloads
        rollout = GaugeMetricFamily(
            "mlproxy_rollout_status",
            "1 for the state each model's canary rollout is in.",
            labels=["model", "status"],
        )
        for model, current in snap.rollouts.items():
            for st_name in ("progressing", "holding", "promoted", "rolled_back"):
                rollout.add_metric([model, st_name], 1.0 if current == st_name else 0.0)
        yield rollout
        yield CounterMetricFamily("mlproxy_alerts", "Alerts raised since start.", value=snap.alerts)
        yield GaugeMetricFamily(
            "mlproxy_config_loaded_timestamp_seconds",
            "When the config in force was loaded (unix time).",
            value=snap.config_loaded_at,
        )


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:.6g}"


def create_registry(snapshot: Callable[[], Snapshot]) -> CollectorRegistry:
    """A fresh registry holding the proxy's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(snapshot))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    data: bytes = generate_latest(registry)
    return data
