"""What the admin plane shows: /admin/status, /admin/monitor and the Prometheus snapshots,
built from the live parts by reading only (nothing here judges, alerts or writes)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from proxy.config.schema import Config, VersionKey
from proxy.engine.admission import Admission
from proxy.engine.batching import BatcherState
from proxy.engine.counters import Counters
from proxy.http.snapshots import MonitorSnapshot, MonitorView, Snapshot, VersionView
from proxy.models.manifest import Manifest
from proxy.monitoring.alerts import Alerts
from proxy.monitoring.tracker import VersionMonitor
from proxy.monitoring.watch import VersionWatch, Watch
from proxy.runtime.current import Current
from proxy.runtime.group import Group
from proxy.runtime.load import LoopLoad
from proxy.runtime.plan import Plan
from proxy.runtime.reloader import Reloader
from proxy.runtime.rollouts import Rollouts
from proxy.runtime.webhooks import Webhooks


class AdminState(Protocol):
    """What the admin plane reads, and the two things it acts on (reloader, rollouts);
    runtime.serving.Serving is one. The admin plane gets nothing else."""

    @property
    def current(self) -> Current: ...

    @property
    def counters(self) -> Counters: ...

    @property
    def admission(self) -> Admission[Any]: ...

    @property
    def reloader(self) -> Reloader: ...

    @property
    def rollouts(self) -> Rollouts: ...

    @property
    def load(self) -> LoopLoad: ...

    @property
    def watch(self) -> Watch: ...

    @property
    def alerts(self) -> Alerts: ...

    @property
    def webhooks(self) -> Webhooks: ...

    @property
    def group(self) -> Group: ...

    @property
    def plan(self) -> Plan: ...

    @property
    def config(self) -> Config: ...


def snapshot(serving: AdminState) -> Snapshot:
    views = []
    plan = serving.plan
    counters = serving.counters
    for mp in plan.models.values():
        split = mp.strategy.split()
        for v, backend in mp.backends.items():
            extra: dict[str, int] = {}
            state = backend.batcher_state()
            if state is not None:
                extra = {
                    "batches": state.stats.batches,
                    "batch_rows": state.stats.rows,
                    "queue_depth": state.queue_depth,
                    "shed": state.stats.shed,
                }
            views.append(
                VersionView(
                    mp.name,
                    v,
                    backend.kind,
                    split.get(v, 0.0),
                    mp.stats[v],
                    fallbacks=counters.fallbacks_of(VersionKey(mp.name, v)),
                    available=backend.available,
                    upstream=backend.health(),
                    **extra,
                )
            )
    return Snapshot(
        views,
        serving.current.inflight,
        counters.shed_total,
        plan.loaded_at,
        reloads=counters.reloads(),
        rollouts=serving.rollouts.statuses(),
        alerts=serving.alerts.raised,
        config_ok=serving.reloader.last_error is None,
        admission_limit=serving.admission.limit.limit,
        admission_waiting=serving.admission.waiting,
        refused={str(k): v for k, v in counters.refused_counts().items()},
    )


def _admission(serving: AdminState) -> dict[str, Any]:
    a = serving.admission
    return {
        "limit": a.limit.limit,
        "ceiling": a.limit.ceiling,
        "adaptive": a.limit.adaptive,
        "running": a.inflight,
        "waiting": a.waiting,
        "lifo": a.lifo,
        "held": a.held,
        "standing": a.standing,
        "latency_ms": round(a.limit.latency_s * 1000, 3),
        "lag_ms": round(a.limit.lag_s * 1000, 3),
    }


LEVELS = {"ok": 0, "warn": 1, "alert": 2}


def monitor_snapshot(serving: AdminState) -> MonitorSnapshot:
    w = serving.watch
    views = []
    for (model, version), vw in w.versions.items():
        mp = serving.plan.models.get(model)
        if mp is None or version not in mp.backends:
            continue
        backend = mp.backends[version]
        mon = vw.monitor
        rates = mon.rates() if mon else {"out_of_range": None, "duplicates": None}
        state = backend.batcher_state()
        bs = None if state is None else state.stats
        views.append(
            MonitorView(
                model=model,
                version=version,
                names=mon.baseline.names if mon else [],
                short=mon.judged.get("short") if mon else None,
                long=mon.judged.get("long") if mon else None,
                levels={k[0]: LEVELS[lv] for k, lv in mon.levels.items()} if mon else {},
                out_of_range=rates["out_of_range"],
                duplicates=rates["duplicates"],
                accuracy_short=vw.accuracy.accuracy("short"),
                accuracy_long=vw.accuracy.accuracy("long"),
                holdout_accuracy=vw.holdout_accuracy,
                mae_short=vw.accuracy.mae("short"),
                mae_long=vw.accuracy.mae("long"),
                holdout_mae=vw.holdout_mae,
                queue_wait=bs.queue_wait if bs else None,
                batch_rows=dict(bs.batch_rows_hist) if bs else {},
            )
        )
    kinds: dict[str, int] = {}
    for a in serving.alerts.open_alerts():
        kinds[a.kind] = kinds.get(a.kind, 0) + 1
    return MonitorSnapshot(
        versions=views,
        loop_lag_s=serving.load.lag_s,
        loop_busy=serving.load.busy,
        nonfinite=serving.counters.nonfinite_counts(),
        feedback={(m, str(o)): n for (m, o), n in serving.counters.feedback_counts().items()},
        webhook=serving.webhooks.counts(),
        open_alerts=kinds,
    )


def _mae(vw: VersionWatch) -> dict[str, Any]:
    """A regression version's rolling MAE per window, and its holdout MAE."""
    return {
        "short": _round(vw.accuracy.mae("short")),
        "long": _round(vw.accuracy.mae("long")),
        "holdout": vw.holdout_mae,
    }


def _monitoring_summary(vw: VersionWatch) -> dict[str, Any]:
    """Drift in a line per window: rows judged, the worst distribution and its scores."""
    mon = vw.monitor
    doc: dict[str, Any] = {
        "accuracy": {
            "short": _round(vw.accuracy.accuracy("short")),
            "long": _round(vw.accuracy.accuracy("long")),
            "holdout": vw.holdout_accuracy,
            "labelled_rows": vw.accuracy.rows,
        },
    }
    if vw.accuracy.regression:
        doc["mae"] = _mae(vw)
    if mon is None:
        doc["drift"] = None
        return doc
    drift: dict[str, Any] = {}
    for window in ("short", "long"):
        j = mon.judged.get(window)
        if j is None:
            drift[window] = None
            continue
        i = int(j.psi.argmax())
        drift[window] = {
            "rows": j.rows,
            "worst": mon.baseline.names[i],
            "psi": _round(j.psi[i]),
            "ks": _round(j.ks[i]),
            "js": _round(j.js[i]),
            "chi2_p": _round(j.chi2_p),
        }
    doc["drift"] = drift
    doc["rows_seen"] = int(mon.cumulative[0])  # every row binned (all workers' under workers = N)
    doc["levels"] = {k[0]: lv for k, lv in mon.levels.items() if lv != "ok"}
    doc["rates"] = mon.rates()
    return doc


def status(serving: AdminState) -> dict[str, Any]:
    plan = serving.plan
    models: dict[str, Any] = {}
    now = asyncio.get_running_loop().time()
    counters = serving.counters
    open_alerts = [a.to_json() for a in serving.alerts.open_alerts()]
    for mp in plan.models.values():
        split = mp.strategy.split()
        versions: dict[str, Any] = {}
        for v, backend in mp.backends.items():
            doc = mp.stats[v].summary()
            doc["kind"] = backend.kind
            doc["weight"] = split.get(v, 0.0)
            doc["fallbacks"] = counters.fallbacks_of(VersionKey(mp.name, v))
            doc["available"] = backend.available
            health = backend.health()
            if health is not None:
                doc["upstream"] = health.to_json()
            state = backend.batcher_state()
            if state is not None:
                doc["batching"] = _batching(state)
            vw = serving.watch.versions.get(VersionKey(mp.name, v))
            if vw is not None:
                doc["monitoring"] = _monitoring_summary(vw)
            doc["alerts"] = [a for a in open_alerts if a["model"] == mp.name and a["version"] == v]
            lane = mp.lanes.get(v)
            if lane is not None:
                doc["mirror"]["queued_rows"] = lane.queued_rows
                doc["mirror"]["breaker_open"] = lane.breaker_open
            versions[v] = doc
        controller = serving.rollouts.get(mp.name)
        models[mp.name] = {
            "mode": mp.config.mode,
            "stable": mp.config.stable,
            "ready": mp.ready(),
            "weights": split,
            "mirrors": list(mp.strategy.mirrors),
            "rollout": None if controller is None else controller.describe(now),
            "versions": versions,
        }
    return {
        "config": {
            "source": plan.config.source,
            "digest": plan.config.digest,
            "loaded_at": plan.loaded_at,
            "last_error": serving.reloader.last_error,
            "reloads": counters.reloads(),
        },
        "workers": serving.group.members(),
        "inflight": serving.current.inflight,
        "shed": counters.shed_total,
        "admission": _admission(serving),
        "refused": {str(k): v for k, v in counters.refused_counts().items()},
        "loop_lag_ms": round(serving.load.lag_s * 1000, 3),
        "loop_busy": round(serving.load.busy, 3),
        "mirrors_yield": serving.load.mirrors_yield,
        "alerts": len(serving.alerts.recent()),
        "open_alerts": open_alerts,
        "models": models,
    }


def _monitor_plots(doc: dict[str, Any], mon: VersionMonitor, manifest: Manifest | None) -> None:
    """A monitored version's feature histograms (with their edges) and drift per distribution."""
    edges = () if manifest is None else manifest.feature_edges
    for e, h in zip(edges, mon.histograms(), strict=True):
        doc["features"].append({**h, "edges": list(e)})
    short, long = mon.judged.get("short"), mon.judged.get("long")
    for i, fname in enumerate(mon.baseline.names):
        doc["drift"].append(
            {
                "name": fname,
                "psi_short": None if short is None else _round(short.psi[i]),
                "psi_long": None if long is None else _round(long.psi[i]),
                "ks_short": None if short is None else _round(short.ks[i]),
                "js_short": None if short is None else _round(short.js[i]),
                # no level until a window is full enough to be judged
                "level": mon.levels.get((fname, "psi", "any"), "ok") if short or long else None,
            }
        )


def _batching(state: BatcherState) -> dict[str, Any]:
    bs = state.stats
    return {
        "batches": bs.batches,
        "mean_rows": round(bs.rows / bs.batches, 2) if bs.batches else None,
        "max_rows": bs.max_batch_rows,
        "inline_batches": bs.inline_batches,
        "inline_limit_us": round(state.inline_max_s * 1e6, 1),
        "run_cost_us": {
            f"{1 << k}-{(2 << k) - 1}": round(c * 1e6, 1)
            for k, c in enumerate(bs.run_cost_s)
            if c is not None
        },
        "queue_depth": state.queue_depth,
        "shed": bs.shed,
    }


def _round(v: float | None, digits: int = 5) -> float | None:
    return None if v is None else round(float(v), digits)


def monitor_doc(serving: AdminState) -> dict[str, Any]:
    """What the dashboard draws (GET /admin/monitor): per model and version, latency over time,
    feature histograms against their baseline, drift scores, agreement, accuracy, open alerts."""
    plan = serving.plan
    models: dict[str, Any] = {}
    for name, mp in plan.models.items():
        d = mp.config.drift
        versions: dict[str, Any] = {}
        for v in mp.backends:
            st = mp.stats[v]
            vw = serving.watch.versions.get(VersionKey(name, v))
            mon = vw.monitor if vw else None
            doc: dict[str, Any] = {
                "requests": st.requests,
                "errors": st.errors,
                "latency_ms": {
                    k: _round(None if (q := st.latency.quantile(p)) is None else q * 1000, 4)
                    for k, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
                },
                "history": [
                    {k: h[k] for k in ("ts", "p50", "p90", "p99", "rps")}
                    for h in (vw.history.points if vw else [])
                ],
                "features": [],
                "drift": [],
                "agreement": _round(st.mirror.agreement()),
                "accuracy": {
                    "short": _round(vw.accuracy.accuracy("short")) if vw else None,
                    "long": _round(vw.accuracy.accuracy("long")) if vw else None,
                    "holdout": vw.holdout_accuracy if vw else None,
                },
                "mae": _mae(vw) if vw and vw.accuracy.regression else None,
                "rates": mon.rates() if mon else {"out_of_range": None, "duplicates": None},
            }
            if mon is not None:
                _monitor_plots(doc, mon, mp.backends[v].manifest)
            versions[v] = doc
        models[name] = {
            "mode": mp.config.mode,
            "split": mp.strategy.split(),
            "thresholds": {"psi_warn": d.psi_warn, "psi_alert": d.psi_alert},
            "versions": versions,
        }
    return {
        "ts": time.time(),
        "models": models,
        "alerts": [a.to_json() for a in serving.alerts.open_alerts()],
    }
