"""Watching what is served: drift, input anomalies, concept drift, overload -> alerts."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from proxy.config.schema import AlertsConfig, Config, DriftConfig, ModelConfig, VersionKey
from proxy.engine.batching import BatcherState, Observer
from proxy.engine.counters import Counters, FeedbackOutcome
from proxy.engine.stats import VersionStats
from proxy.errors import InvalidFeedbackError, PredictionNotFoundError
from proxy.monitoring.alerts import AlertKind, Alerts
from proxy.monitoring.baseline import Baseline
from proxy.monitoring.feedback import AccuracyTracker, Prediction, PredictionStore
from proxy.monitoring.history import HISTORY_EVERY_S, History
from proxy.monitoring.overload import OverloadWatch
from proxy.monitoring.tracker import DriftEvent, Role, VersionMonitor
from proxy.protocol.feedback import Classes, Truths, Values
from proxy.protocol.ids import RequestIds

Array = np.ndarray[Any, Any]
DUPLICATE_ALERT = 0.2  # one identical row taking this share of recent rows: a stuck client
DUPLICATE_CLEAR = 0.1


class Store(Protocol):
    """Where predictions wait for feedback (feedback.PredictionStore in one process,
    shared_store.SharedPredictionStore under `workers = N`)."""

    @property
    def capacity(self) -> int: ...

    def put(self, request_id: str, version: str, labels: Array, seq: int = -1) -> None: ...

    def get(self, request_id: str, *, remove: bool = False) -> Prediction | None: ...

    def pop(self, request_id: str) -> Prediction | None: ...

    def know(self, versions: Iterable[str]) -> None: ...


# model, capacity -> its store
Stores = Callable[[str, int], Store]


class WatchedManifest(Protocol):
    """What the watch reads of a version's manifest (models.manifest.Manifest is one)."""

    @property
    def baseline(self) -> Baseline | None: ...

    @property
    def regression(self) -> bool: ...

    @property
    def holdout_accuracy(self) -> float | None: ...

    @property
    def holdout_mae(self) -> float | None: ...


class WatchedVersion(Protocol):
    """What the watch needs of a served version (models.backends.Backend is one)."""

    @property
    def manifest(self) -> WatchedManifest | None: ...

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
    """Everything watched about one version, kept across reloads."""

    key: VersionKey
    drift: DriftConfig
    monitor: VersionMonitor | None
    accuracy: AccuracyTracker
    holdout_accuracy: float | None
    holdout_mae: float | None = None  # regression versions
    history: History = field(default_factory=History)


@dataclass(frozen=True, slots=True)
class Joined:
    """Feedback that joined its prediction: which version answered, how many rows it labelled."""

    version: str
    rows: int


class Watch:
    """Owns the monitors of every version, the prediction store for feedback, and turns what they
    see into alerts (each fires once when its condition starts and once when it clears).

    Judging happens on the record path (`observe`, `join`) and in `housekeeping`, never when
    something is read: a scrape or a status page cannot fire an alert."""

    def __init__(
        self,
        alerts: Alerts,
        counters: Counters,
        *,
        ids: RequestIds,
        role: Role = "local",
        stores: Stores | None = None,
    ) -> None:
        self.alerts = alerts
        self.role = role  # how its monitors get their counts (tracker.Role)
        self._stores = stores or (lambda _model, capacity: PredictionStore(capacity, ids))
        self._counters = counters
        self._ids = ids  # made the ids of requests that came without one
        self.versions: dict[VersionKey, VersionWatch] = {}
        self.predictions: dict[str, Store] = {}
        self._truths: dict[str, Truths] = {}
        self._overload = OverloadWatch(alerts)
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
                store = self.predictions[name] = self._stores(name, d.predictions)
            store.know(mp.backends)
            self._truths[name] = _truths(name, mp.backends.values())
            for version, backend in mp.backends.items():
                key = VersionKey(name, version)
                vw = self.versions.get(key)
                if vw is None or vw.drift != d:
                    vw = self.versions[key] = _version_watch(key, d, backend.manifest, self.role)
                observer = functools.partial(self.observe, key) if vw.monitor is not None else None
                # Only what a version answers is monitored: mirrored rows are the primary's
                # inputs, already counted; a mirror is judged by its agreement with the primary.
                backend.set_observer(observer)

    # ---------------------------------------------------------------- data drift

    def observe(self, key: VersionKey, x: Array, outputs: dict[str, Array]) -> None:
        vw = self.versions.get(key)
        if vw is not None and vw.monitor is not None:
            self._drift_events(vw, vw.monitor.record(x, outputs))

    def _drift_events(self, vw: VersionWatch, events: list[DriftEvent]) -> None:
        model, version = vw.key
        for e in events:
            key = f"drift:{model}:{version}:{e.name}"
            if e.level == "alert":
                self.alerts.fire(
                    key,
                    AlertKind.DRIFT,
                    model=model,
                    version=version,
                    message=(
                        f"{e.name} of {vw.key} drifted: PSI {e.value:.3f} > psi_alert"
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
                    f"{e.name} of {vw.key} is back under psi_alert (PSI {e.value:.3f}, {e.level})",
                    value=round(e.value, 6),
                )

    def advance(self, key: VersionKey, total: Array) -> None:
        """A pooled monitor's step: the group's cumulative counts of `key` now (the supervisor
        of `workers = N` judges every worker's traffic as one)."""
        vw = self.versions.get(key)
        if vw is not None and vw.monitor is not None:
            self._drift_events(vw, vw.monitor.advance(total))

    def flush(self) -> None:
        """Bin every buffered row now and judge the windows (housekeeping's first step)."""
        for vw in self.versions.values():
            if vw.monitor is not None:
                self._drift_events(vw, vw.monitor.flush())

    # ---------------------------------------------------------------- concept drift

    def truths(self, model: str) -> Truths:
        """What feedback for `model` may say (protocol.feedback.parse_feedback checks it)."""
        return self._truths.get(model) or Classes(model)

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

    def join(self, model: str, request_id: str, truth: Array) -> Joined:
        """Join ground truth to a stored prediction. PredictionNotFoundError when there is none;
        InvalidFeedbackError (the prediction stays stored) when the truth does not fit it."""
        store = self.predictions.get(model)
        pred = None if store is None else store.get(request_id)  # taken out once it joins
        if store is None or pred is None:
            self._counters.feedback(model, FeedbackOutcome.UNKNOWN_ID)
            raise PredictionNotFoundError(model, request_id, 0 if store is None else store.capacity)
        if truth.shape != pred.labels.shape:  # left stored: the client can fix its call
            n, rows = truth.size, pred.labels.size
            raise InvalidFeedbackError(
                f"{n} label{'s' if n != 1 else ''} for request {request_id!r}, which had {rows}"
                f" row{'s' if rows != 1 else ''}: send one label per input row (for a regression"
                " model, one value); the prediction stays stored"
            )
        vw = self.versions.get(VersionKey(model, pred.version))
        if vw is None:
            raise InvalidFeedbackError(f"version {pred.version} of {model} is no longer watched")
        if not vw.accuracy.regression and truth.dtype.kind not in "iub":
            raise InvalidFeedbackError(
                f"{model}/{pred.version} is a classifier: label must be an integer class (or a"
                " list of them), not a fractional number"
            )
        store.pop(request_id)
        vw.accuracy.record(pred.labels, truth)
        self._counters.feedback(model, FeedbackOutcome.JOINED)
        if self.role == "local":  # under workers = N the supervisor judges the pooled joins
            self._check_accuracy(vw)
        return Joined(pred.version, int(truth.size))

    def advance_accuracy(self, key: VersionKey, total: Array) -> None:
        """The supervisor's step: the group's pooled feedback counts of `key` now."""
        vw = self.versions.get(key)
        if vw is not None and vw.accuracy.advance(total):
            self._check_accuracy(vw)

    def _check_accuracy(self, vw: VersionWatch) -> None:
        """Fire (or clear) concept drift: short-window accuracy under holdout - accuracy_margin,
        or, for a regression model, short-window MAE over holdout MAE x (1 + mae_margin)."""
        name = str(vw.key)
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
        key = f"concept:{vw.key.model}:{vw.key.version}"
        if bad:
            self.alerts.fire(
                key,
                AlertKind.CONCEPT_DRIFT,
                model=vw.key.model,
                version=vw.key.version,
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

    def housekeeping(self, now: float, plan: WatchedPlan, *, loop_lag_s: float = 0.0) -> None:
        """Periodic step (every 0.25 s in the server; tests call it): flush and judge monitors,
        judge input anomalies and overload, and sample latency history."""
        self.flush()
        for vw in self.versions.values():
            self._check_duplicates(vw)
        waits = []
        for mp in plan.models.values():
            for b in mp.backends.values():
                state = b.batcher_state()
                if state is not None and state.queue_depth:
                    waits.append(state.stats.last_wait_s)
        self._overload.check(
            now,
            config=self.alerts_config,
            lag_s=loop_lag_s,
            waits=waits,
            wait_limit_s=plan.config.limits.queue_timeout_ms / 2000.0,
        )
        if now >= self._next_history:
            self._next_history = now + HISTORY_EVERY_S
            for name, mp in plan.models.items():
                for version in mp.backends:
                    watched = self.versions.get(VersionKey(name, version))
                    if watched is not None:
                        watched.history.sample(mp.stats[version])

    def _check_duplicates(self, vw: VersionWatch) -> None:
        mon = vw.monitor
        if mon is None:
            return
        dup = mon.rates()["duplicates"]
        if dup is None:
            return
        model, version = vw.key
        key = f"duplicates:{model}:{version}"
        if mon.recent_rows >= min(mon.duplicate_memory, vw.drift.window) and dup > DUPLICATE_ALERT:
            self.alerts.fire(
                key,
                AlertKind.DUPLICATE_INPUTS,
                model=model,
                version=version,
                message=(
                    f"one input row is {dup:.0%} of the last rows sent to {vw.key}:"
                    " a client resending the same input?"
                ),
                value=round(dup, 6),
            )
        elif dup < DUPLICATE_CLEAR:
            self.alerts.resolve(key, f"duplicate rows down to {dup:.0%}", value=round(dup, 6))


def _truths(model: str, versions: Iterable[WatchedVersion]) -> Truths:
    """Finite numbers when every version is a regressor (or when the versions mix tasks: `join`
    still refuses fractions for a classifier's prediction); else classes: all that the versions'
    baselines list, or any integer class when one version's are not known (no manifest, or no
    baseline in it)."""
    manifests = [v.manifest for v in versions]
    if any(m is not None and m.regression for m in manifests):
        return Values(model)
    classes: set[int] = set()
    for m in manifests:
        known = None if m is None or m.baseline is None else m.baseline.classes
        if known is None or known.dtype.kind not in "iu":
            return Classes(model)
        classes.update(int(c) for c in known.reshape(-1))
    return Classes(model, tuple(sorted(classes)) or None)


def _version_watch(
    key: VersionKey, d: DriftConfig, manifest: WatchedManifest | None, role: Role
) -> VersionWatch:
    baseline = manifest.baseline if manifest is not None and d.enabled else None
    monitor = (
        None
        if baseline is None
        else VersionMonitor(baseline, d.window, d.long_window, d.psi_warn, d.psi_alert, role=role)
    )
    regression = manifest is not None and manifest.regression
    return VersionWatch(
        key=key,
        drift=d,
        monitor=monitor,
        accuracy=AccuracyTracker(d.window, d.long_window, d.min_feedback, regression),
        holdout_accuracy=None if manifest is None else manifest.holdout_accuracy,
        holdout_mae=None if manifest is None else manifest.holdout_mae,
    )
