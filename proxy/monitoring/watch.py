"""Watching what is served: drift, input anomalies, concept drift, overload -> alerts."""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Protocol

import numpy as np

from proxy.config.schema import AlertsConfig, Config, DriftConfig, ModelConfig
from proxy.engine.batching import BatcherState, Observer
from proxy.engine.stats import LatencyHistogram, VersionStats
from proxy.monitoring.alerts import Alerts
from proxy.monitoring.baseline import Baseline
from proxy.monitoring.feedback import AccuracyTracker, PredictionStore
from proxy.monitoring.tracker import DriftEvent, VersionMonitor

Array = np.ndarray[Any, Any]
HISTORY_POINTS = 120  # latency history kept per version, one point per HISTORY_EVERY_S
HISTORY_EVERY_S = 2.0
DUPLICATE_ALERT = 0.2  # one identical row taking this share of recent rows: a stuck client
DUPLICATE_CLEAR = 0.1


class WatchedVersion(Protocol):
    """What the watch needs of a served version (models.backends.Backend is one)."""

    @property
    def manifest_raw(self) -> dict[str, Any]: ...

    def set_observer(self, observer: Observer | None) -> None: ...

    def batcher_state(self) -> BatcherState | None: ...


class WatchedModel(Protocol):
    """What the watch needs of a served model (runtime.plan.ModelPlan is one)."""

    @property
    def config(self) -> ModelConfig: ...

    @property
    def backends(self) -> Mapping[str, WatchedVersion]: ...

    @property
    def stats(self) -> Mapping[str, VersionStats]: ...


class WatchedPlan(Protocol):
    """What the watch needs of the plan in force (runtime.plan.Plan is one)."""

    @property
    def config(self) -> Config: ...

    @property
    def models(self) -> Mapping[str, WatchedModel]: ...


@dataclass
class VersionWatch:
    """Everything watched about one (model, version), kept across reloads."""

    model: str
    version: str
    drift: DriftConfig
    monitor: VersionMonitor | None
    accuracy: AccuracyTracker
    holdout_accuracy: float | None
    holdout_mae: float | None = None  # regression versions
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    last_counts: Array | None = None
    last_requests: int = 0


class Watch:
    """Owns the monitors of every version, the prediction store for feedback, and turns what they
    see into alerts (each fires once when its condition starts and once when it clears)."""

    def __init__(self, alerts: Alerts) -> None:
        self.alerts = alerts
        self.versions: dict[tuple[str, str], VersionWatch] = {}
        self.predictions: dict[str, PredictionStore] = {}
        self.nonfinite: dict[str, int] = {}
        self.feedback: dict[tuple[str, str], int] = {}
        self.loop_lag_s = 0.0
        self.loop_busy = 0.0  # the serving loop thread's CPU share over the last interval
        self._overloaded_since: float | None = None
        self._next_history = 0.0
        self.alerts_config = AlertsConfig()

    # ---------------------------------------------------------------- wiring

    def attach(self, plan: WatchedPlan) -> None:
        """Give every version of a (new) plan its watch: monitors outlive plans and reloads."""
        self.alerts_config = plan.config.alerts
        for name, mp in plan.models.items():
            d = mp.config.drift
            store = self.predictions.get(name)
            if store is None or store.capacity != d.predictions:
                self.predictions[name] = PredictionStore(d.predictions)
            for version, backend in mp.backends.items():
                key = (name, version)
                vw = self.versions.get(key)
                raw = backend.manifest_raw
                if vw is None or vw.drift != d:
                    baseline = Baseline.from_manifest(raw) if d.enabled else None
                    monitor = (
                        None
                        if baseline is None
                        else VersionMonitor(
                            baseline, d.window, d.long_window, d.psi_warn, d.psi_alert
                        )
                    )
                    holdout = (raw.get("metrics") or {}).get("holdout") or {}
                    regression = raw.get("task") == "regression"
                    vw = VersionWatch(
                        name,
                        version,
                        d,
                        monitor,
                        AccuracyTracker(d.window, d.long_window, d.min_feedback, regression),
                        holdout.get("accuracy"),
                        holdout.get("mae"),
                    )
                    self.versions[key] = vw
                observer = (
                    functools.partial(self.observe, name, version)
                    if vw.monitor is not None
                    else None
                )
                # Only what a version answers is monitored: mirrored rows are the primary's
                # inputs, already counted; a mirror is judged by its agreement with the primary.
                backend.set_observer(observer)

    # ---------------------------------------------------------------- data drift

    def observe(self, model: str, version: str, x: Array, outputs: dict[str, Array]) -> None:
        vw = self.versions.get((model, version))
        if vw is not None and vw.monitor is not None:
            self._drift_events(vw, vw.monitor.record(x, outputs))

    def _drift_events(self, vw: VersionWatch, events: list[DriftEvent]) -> None:
        for e in events:
            key = f"drift:{vw.model}:{vw.version}:{e.name}"
            if e.level == "alert":
                self.alerts.fire(
                    key,
                    "drift",
                    model=vw.model,
                    version=vw.version,
                    message=(
                        f"{e.name} of {vw.model}/{vw.version} drifted: PSI {e.value:.3f} > psi_alert"
                        f" {vw.drift.psi_alert} over the {e.window} window ({e.kind} change)"
                    ),
                    feature=e.name,
                    statistic="psi",
                    value=round(e.value, 6),
                    window=e.window,
                    change=e.kind,
                )
            else:
                self.alerts.resolve(
                    key,
                    f"{e.name} of {vw.model}/{vw.version} is back under psi_alert"
                    f" (PSI {e.value:.3f}, {e.level})",
                    value=round(e.value, 6),
                )

    def flush(self) -> None:
        """Bin every buffered row now (readers call it, so what they see is current)."""
        for vw in self.versions.values():
            if vw.monitor is not None:
                self._drift_events(vw, vw.monitor.flush())

    # ---------------------------------------------------------------- concept drift

    def remember(
        self, model: str, request_id: str, version: str, outputs: dict[str, Array], seq: int = -1
    ) -> None:
        """Keep a prediction for feedback to join; `seq` >= 0: the id was made up from it."""
        store = self.predictions.get(model)
        label = outputs.get("label")
        if label is None:
            label = outputs.get("variable")  # a regression model's answer
        if store is not None and label is not None:
            store.put(request_id, version, label, seq)

    def join(self, model: str, request_id: str, truth: Array) -> tuple[str, int] | str:
        """Join ground truth to a stored prediction; (version, rows) or the reason it failed."""
        store = self.predictions.get(model)
        pred = None if store is None else store.get(request_id)  # taken out once it joins
        if pred is None:
            key = (model, "unknown_id")
            self.feedback[key] = self.feedback.get(key, 0) + 1
            kept = 0 if store is None else store.capacity
            return (
                f"no stored prediction for id {request_id!r}: never answered by {model}, already"
                f" joined, or dropped (only the last {kept} predictions are kept)"
            )
        if truth.shape != pred.labels.shape:  # left stored: the client can fix its call
            return (
                f"label has shape {list(truth.shape)} but request {request_id!r} predicted"
                f" {list(pred.labels.shape)} rows; send one label per input row"
            )
        vw = self.versions.get((model, pred.version))
        if vw is None:
            return f"version {pred.version} of {model} is no longer watched"
        if not vw.accuracy.regression and truth.dtype.kind not in "iub":
            return (
                f"{model}/{pred.version} is a classifier: label must be an integer class (or a"
                " list of them), not a fractional number"
            )
        assert store is not None
        store.pop(request_id)
        vw.accuracy.record(pred.labels, truth)
        key = (model, "joined")
        self.feedback[key] = self.feedback.get(key, 0) + 1
        self._check_accuracy(vw)
        return pred.version, int(truth.size)

    def _check_accuracy(self, vw: VersionWatch) -> None:
        """Fire (or clear) concept drift: short-window accuracy under holdout - accuracy_margin,
        or, for a regression model, short-window MAE over holdout MAE x (1 + mae_margin)."""
        name = f"{vw.model}/{vw.version}"
        if vw.accuracy.regression:
            value, holdout = vw.accuracy.mae("short"), vw.holdout_mae
            if value is None or holdout is None:
                return
            bad = value > holdout * (1.0 + vw.drift.mae_margin)
            statistic = "mae"
            what = f"mean absolute error of {name} on fed-back values is {value:.4g}"
            why = f"above its holdout {holdout:.4g} x (1 + mae_margin {vw.drift.mae_margin})"
        else:
            value, holdout = vw.accuracy.accuracy("short"), vw.holdout_accuracy
            if value is None or holdout is None:
                return
            bad = value < holdout - vw.drift.accuracy_margin
            statistic = "accuracy"
            what = f"accuracy of {name} on fed-back labels is {value:.3f}"
            why = f"below its holdout {holdout:.3f} - margin {vw.drift.accuracy_margin}"
        key = f"concept:{vw.model}:{vw.version}"
        if bad:
            self.alerts.fire(
                key,
                "concept_drift",
                model=vw.model,
                version=vw.version,
                message=f"{what}, {why}",
                value=round(value, 6),
                holdout=holdout,
                statistic=statistic,
                window="short",
            )
        else:
            self.alerts.resolve(
                key, f"{statistic} of {name} back to {value:.4g}", value=round(value, 6)
            )

    # ---------------------------------------------------------------- software

    def housekeeping(self, now: float, plan: WatchedPlan, stats: Any) -> None:
        """Periodic step (every 0.25 s in the server; tests call it): flush monitors, judge input
        anomalies and overload, and sample latency history."""
        self.flush()
        for vw in self.versions.values():
            if vw.monitor is None:
                continue
            rates = vw.monitor.rates()
            dup = rates["duplicates"]
            key = f"duplicates:{vw.model}:{vw.version}"
            if (
                dup is not None
                and vw.monitor.recent_rows >= min(vw.monitor.duplicate_memory, vw.drift.window)
                and dup > DUPLICATE_ALERT
            ):
                self.alerts.fire(
                    key,
                    "duplicate_inputs",
                    model=vw.model,
                    version=vw.version,
                    message=(
                        f"one input row is {dup:.0%} of the last rows sent to {vw.model}/{vw.version}:"
                        " a client resending the same input?"
                    ),
                    value=round(dup, 6),
                )
            elif dup is not None and dup < DUPLICATE_CLEAR:
                self.alerts.resolve(key, f"duplicate rows down to {dup:.0%}", value=round(dup, 6))
        self._check_overload(now, plan)
        if now >= self._next_history:
            self._next_history = now + HISTORY_EVERY_S
            self._sample_history(plan, stats)

    def loop_lag(self, lag_s: float) -> None:
        self.loop_lag_s = max(lag_s, 0.0)

    def _check_overload(self, now: float, plan: WatchedPlan) -> None:
        cfg = self.alerts_config
        waits = []
        for mp in plan.models.values():
            for b in mp.backends.values():
                state = b.batcher_state()
                if state is not None and state.queue_depth:
                    waits.append(state.stats.last_wait_s)
        queue_limit = plan.config.limits.queue_timeout_ms / 2000.0
        hot = self.loop_lag_s * 1000.0 > cfg.overload_lag_ms or any(w > queue_limit for w in waits)
        if hot:
            if self._overloaded_since is None:
                self._overloaded_since = now
            if now - self._overloaded_since >= cfg.overload_for_s:
                self.alerts.fire(
                    "overload",
                    "overload",
                    model="*",
                    version=None,
                    message=(
                        f"overloaded for {now - self._overloaded_since:.1f} s: event-loop lag"
                        f" {self.loop_lag_s * 1000:.0f} ms (limit {cfg.overload_lag_ms:g}),"
                        f" longest queue wait {max(waits, default=0) * 1000:.0f} ms"
                    ),
                    loop_lag_ms=round(self.loop_lag_s * 1000, 3),
                )
        else:
            self._overloaded_since = None
            self.alerts.resolve(
                "overload", "load back to normal", loop_lag_ms=round(self.loop_lag_s * 1000, 3)
            )

    def _sample_history(self, plan: WatchedPlan, stats: Any) -> None:
        t = perf_counter()
        for name, mp in plan.models.items():
            for version in mp.backends:
                vw = self.versions.get((name, version))
                if vw is None:
                    continue
                st = mp.stats[version]
                counts = st.latency.counts.copy()
                point: dict[str, Any] = {"t": t, "ts": round(time.time(), 3)}
                if vw.last_counts is not None:
                    h = LatencyHistogram.since(st.latency, vw.last_counts)
                    for q, k in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
                        v = h.quantile(q)
                        point[k] = None if v is None else round(v * 1000, 4)
                    last_t = vw.history[-1]["t"] if vw.history else t - HISTORY_EVERY_S
                    point["rps"] = round(
                        (st.requests - vw.last_requests) / max(t - last_t, 1e-9), 2
                    )
                    vw.history.append(point)
                else:
                    vw.history.append(
                        {
                            "t": t,
                            "ts": round(time.time(), 3),
                            "p50": None,
                            "p90": None,
                            "p99": None,
                            "rps": None,
                        }
                    )
                vw.last_counts = counts
                vw.last_requests = st.requests
