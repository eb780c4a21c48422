"""Prometheus export: a collector that reads the live counters at scrape time (no per-request cost)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.engine.stats import LatencyHistogram, VersionStats
from proxy.monitoring.drift import Judgement

Registry = CollectorRegistry
S = TypeVar("S")
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
    config_ok: bool = True


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
            if m.sent or m.dropped or m.yielded:
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


@dataclass(frozen=True, slots=True)
class MonitorView:
    """What monitoring knows of one version, as the exporter sees it."""

    model: str
    version: str
    names: list[str]
    short: Judgement | None
    long: Judgement | None
    levels: dict[str, int]  # 0 ok, 1 warn, 2 alert, per feature or output
    out_of_range: float | None
    duplicates: float | None
    accuracy_short: float | None
    accuracy_long: float | None
    holdout_accuracy: float | None
    mae_short: float | None
    mae_long: float | None
    holdout_mae: float | None
    queue_wait: LatencyHistogram | None
    batch_rows: dict[int, int]


@dataclass(frozen=True, slots=True)
class MonitorSnapshot:
    versions: list[MonitorView]
    loop_lag_s: float
    loop_busy: float
    nonfinite: dict[str, int]
    feedback: dict[tuple[str, str], int]
    webhook: dict[str, int]
    open_alerts: dict[str, int]


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ALERT_KINDS = ("drift", "concept_drift", "overload", "duplicate_inputs", "canary_rollback")


class MonitorCollector(_SnapshotCollector[MonitorSnapshot]):
    """Drift scores, input anomalies, accuracy, queue waits, loop lag and alerts."""

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        mv = ["model", "version"]
        score = GaugeMetricFamily(
            "mlproxy_drift_score",
            "Drift of a feature or output against the training baseline, per statistic and window.",
            labels=[*mv, "feature", "statistic", "window"],
        )
        level = GaugeMetricFamily(
            "mlproxy_drift_level",
            "Drift level of a feature or output: 0 ok, 1 warn, 2 alert.",
            labels=[*mv, "feature"],
        )
        chi2 = GaugeMetricFamily(
            "mlproxy_output_chi2_pvalue",
            "Chi-square p-value of predicted class counts against baseline.",
            labels=[*mv, "window"],
        )
        oor = GaugeMetricFamily(
            "mlproxy_input_out_of_range_ratio",
            "Input values outside the training range (recent window).",
            labels=mv,
        )
        dup = GaugeMetricFamily(
            "mlproxy_input_duplicate_ratio",
            "Input rows repeating a recent row (recent window).",
            labels=mv,
        )
        acc = GaugeMetricFamily(
            "mlproxy_accuracy_ratio",
            "Accuracy on fed-back ground truth, per window.",
            labels=[*mv, "window"],
        )
        holdout = GaugeMetricFamily(
            "mlproxy_holdout_accuracy_ratio",
            "Holdout accuracy from the version's manifest.",
            labels=mv,
        )
        mae = GaugeMetricFamily(
            "mlproxy_mae",
            "Mean absolute error on fed-back true values (regression models), per window.",
            labels=[*mv, "window"],
        )
        holdout_mae = GaugeMetricFamily(
            "mlproxy_holdout_mae",
            "Holdout mean absolute error from the version's manifest (regression models).",
            labels=mv,
        )
        wait = HistogramMetricFamily(
            "mlproxy_queue_wait_seconds",
            "How long a batch's first request waited for its run.",
            labels=mv,
        )
        rows = HistogramMetricFamily(
            "mlproxy_batch_size_rows", "Rows per onnxruntime run.", labels=mv
        )
        for v in snap.versions:
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
            if v.out_of_range is not None:
                oor.add_metric(lv, v.out_of_range)
            if v.duplicates is not None:
                dup.add_metric(lv, v.duplicates)
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
            if v.queue_wait is not None:
                buckets = [(_le(b), c) for b, c in v.queue_wait.cumulative_export()]
                wait.add_metric(lv, buckets, v.queue_wait.sum)
            if v.batch_rows:
                cum, out, total = 0, [], 0
                for b in BATCH_BUCKETS:
                    cum = sum(c for r, c in v.batch_rows.items() if r <= b)
                    out.append((str(b), cum))
                total = sum(v.batch_rows.values())
                out.append(("+Inf", total))
                rows.add_metric(lv, out, float(sum(r * c for r, c in v.batch_rows.items())))
        yield from (score, level, chi2, oor, dup, acc, holdout, mae, holdout_mae, wait, rows)
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
        hooks = CounterMetricFamily(
            "mlproxy_webhook_deliveries", "Alert webhook deliveries by outcome.", labels=["outcome"]
        )
        for outcome in ("ok", "failed", "dropped"):
            hooks.add_metric([outcome], snap.webhook.get(outcome, 0))
        yield hooks
        opened = GaugeMetricFamily(
            "mlproxy_alerts_open", "Alerts firing now, by kind.", labels=["kind"]
        )
        for kind in ALERT_KINDS:
            opened.add_metric([kind], snap.open_alerts.get(kind, 0))
        yield opened
