"""Prometheus export of what monitoring knows: drift scores, input anomalies, accuracy, queue
waits, loop lag, feedback, webhooks and alerts, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from proxy.http.collectors import MV, SnapshotCollector, buckets
from proxy.http.snapshots import MonitorSnapshot, MonitorView
from proxy.monitoring.alerts import AlertKind

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # rows per run


class MonitorCollector(SnapshotCollector[MonitorSnapshot]):
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
            wait.add_metric(lv, buckets(v.queue_wait), v.queue_wait.sum)
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
