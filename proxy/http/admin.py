"""The admin plane on its own port: status, metrics, alerts, reload, promote and rollback."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.http.metrics import (
    CONTENT_TYPE,
    MonitorSnapshot,
    MonitorView,
    Registry,
    Snapshot,
    VersionView,
    create_registry,
    render,
)
from proxy.models.backends import LocalBackend
from proxy.runtime.serving import Serving

SERVING = web.AppKey("serving", Serving)
REGISTRY = web.AppKey("registry", Registry)
log = logging.getLogger("mlproxy.admin")
DASHBOARD = Path(__file__).with_name("dashboard.html")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def snapshot(serving: Serving) -> Snapshot:
    views = []
    plan = serving.plan
    for mp in plan.models.values():
        split = mp.strategy.split()
        for v, backend in mp.backends.items():
            extra: dict[str, int] = {}
            if isinstance(backend, LocalBackend):
                bs = backend.batcher.stats
                extra = {
                    "batches": bs.batches,
                    "batch_rows": bs.rows,
                    "queue_depth": backend.batcher.queue_depth,
                    "shed": bs.shed,
                }
            views.append(
                VersionView(
                    mp.name,
                    v,
                    backend.kind,
                    split.get(v, 0.0),
                    mp.stats[v],
                    fallbacks=serving.fallbacks.get((mp.name, v), 0),
                    **extra,
                )
            )
    return Snapshot(
        views,
        serving.inflight,
        serving.shed,
        plan.loaded_at,
        reloads=dict(serving.reloads),
        rollouts={name: c.status for name, c in serving.controllers.items()},
        alerts=serving.alerts.raised,
        config_ok=serving.last_error is None,
    )


LEVELS = {"ok": 0, "warn": 1, "alert": 2}


def monitor_snapshot(serving: Serving) -> MonitorSnapshot:
    w = serving.watch
    w.flush()
    views = []
    for (model, version), vw in w.versions.items():
        mp = serving.plan.models.get(model)
        if mp is None or version not in mp.backends:
            continue
        backend = mp.backends[version]
        mon = vw.monitor
        rates = mon.rates() if mon else {"out_of_range": None, "duplicates": None}
        bs = backend.batcher.stats if isinstance(backend, LocalBackend) else None
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
        kinds[a["kind"]] = kinds.get(a["kind"], 0) + 1
    return MonitorSnapshot(
        versions=views,
        loop_lag_s=w.loop_lag_s,
        loop_busy=w.loop_busy,
        nonfinite=dict(w.nonfinite),
        feedback=dict(w.feedback),
        webhook=dict(serving.webhook.counts) if serving.webhook else {},
        open_alerts=kinds,
    )


def _mae(vw: Any) -> dict[str, Any]:
    """A regression version's rolling MAE per window, and its holdout MAE."""
    return {
        "short": _round(vw.accuracy.mae("short")),
        "long": _round(vw.accuracy.mae("long")),
        "holdout": vw.holdout_mae,
    }


def _monitoring_summary(vw: Any) -> dict[str, Any]:
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
    doc["levels"] = {k[0]: lv for k, lv in mon.levels.items() if lv != "ok"}
    doc["rates"] = mon.rates()
    return doc


def status(serving: Serving) -> dict[str, Any]:
    plan = serving.plan
    models: dict[str, Any] = {}
    now = serving.loop_time()
    serving.watch.flush()
    open_alerts = serving.alerts.open_alerts()
    for mp in plan.models.values():
        split = mp.strategy.split()
        versions: dict[str, Any] = {}
        for v, backend in mp.backends.items():
            doc = mp.stats[v].summary()
            doc["kind"] = backend.kind
            doc["weight"] = split.get(v, 0.0)
            doc["fallbacks"] = serving.fallbacks.get((mp.name, v), 0)
            if isinstance(backend, LocalBackend):
                bs = backend.batcher.stats
                doc["batching"] = {
                    "batches": bs.batches,
                    "mean_rows": round(bs.rows / bs.batches, 2) if bs.batches else None,
                    "max_rows": bs.max_batch_rows,
                    "inline_batches": bs.inline_batches,
                    "inline_limit_us": round(backend.batcher.inline_max_s * 1e6, 1),
                    "run_cost_us": {
                        f"{1 << k}-{(2 << k) - 1}": round(c * 1e6, 1)
                        for k, c in enumerate(bs.run_cost_s)
                        if c is not None
                    },
                    "queue_depth": backend.batcher.queue_depth,
                    "shed": bs.shed,
                }
            vw = serving.watch.versions.get((mp.name, v))
            if vw is not None:
                doc["monitoring"] = _monitoring_summary(vw)
            doc["alerts"] = [a for a in open_alerts if a["model"] == mp.name and a["version"] == v]
            lane = mp.lanes.get(v)
            if lane is not None:
                doc["mirror"]["queued_rows"] = lane.queued_rows
                doc["mirror"]["breaker_open"] = lane.breaker_open
            versions[v] = doc
        controller = serving.controllers.get(mp.name)
        models[mp.name] = {
            "mode": mp.config.mode,
            "stable": mp.config.stable,
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
            "last_error": serving.last_error,
            "reloads": dict(serving.reloads),
        },
        "inflight": serving.inflight,
        "shed": serving.shed,
        "loop_lag_ms": round(serving.watch.loop_lag_s * 1000, 3),
        "loop_busy": round(serving.watch.loop_busy, 3),
        "mirrors_yield": serving.mirrors_yield,
        "alerts": len(serving.alerts.recent()),
        "open_alerts": serving.alerts.open_alerts(),
        "models": models,
    }


def _round(v: float | None, digits: int = 5) -> float | None:
    return None if v is None else round(float(v), digits)


def monitor_doc(serving: Serving) -> dict[str, Any]:
    """What the dashboard draws (GET /admin/monitor): per model and version, latency over time,
    feature histograms against their baseline, drift scores, agreement, accuracy, open alerts."""
    serving.watch.flush()
    plan = serving.plan
    models: dict[str, Any] = {}
    for name, mp in plan.models.items():
        d = mp.config.drift
        versions: dict[str, Any] = {}
        for v in mp.backends:
            st = mp.stats[v]
            vw = serving.watch.versions.get((name, v))
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
                    for h in (vw.history if vw else [])
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
                manifest_feats = mp.backends[v].manifest_raw["baseline"]["features"]
                for f, h in zip(manifest_feats, mon.histograms(), strict=True):
                    doc["features"].append({**h, "edges": f["edges"]})
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
                            "level": mon.levels.get((fname, "psi", "any"), "ok")
                            if short or long
                            else None,
                        }
                    )
            versions[v] = doc
        models[name] = {
            "mode": mp.config.mode,
            "split": mp.strategy.split(),
            "thresholds": {"psi_warn": d.psi_warn, "psi_alert": d.psi_alert},
            "versions": versions,
        }
    return {"ts": time.time(), "models": models, "alerts": serving.alerts.open_alerts()}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def mutation_guard(serving: Serving, handler: Handler) -> Handler:
    """POST /admin/* needs the bearer token when [admin] token_env names a set variable; with
    no token, mutations are allowed only while the admin plane listens on loopback."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        admin = serving.config.admin
        token = os.environ.get(admin.token_env, "")
        if token:
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                log.warning(
                    "refused %s %s from %s: %s",
                    request.method,
                    request.path,
                    request.remote,
                    "no Authorization header" if not given else "wrong token",
                )
                return web.json_response(
                    {
                        "error": f"this admin API needs 'Authorization: Bearer <token>' (the value of ${admin.token_env})"
                    },
                    status=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        elif not is_loopback(admin.host):
            log.warning(
                "refused %s %s from %s: no admin token set",
                request.method,
                request.path,
                request.remote,
            )
            return web.json_response(
                {
                    "error": f"admin mutations are refused: the admin plane listens on {admin.host}, not"
                    f" loopback, and ${admin.token_env} is not set"
                },
                status=403,
            )
        return await handler(request)

    return guarded


async def _status(request: web.Request) -> web.Response:
    return web.json_response(status(request.app[SERVING]))


async def _metrics(request: web.Request) -> web.Response:
    body = render(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _alerts(request: web.Request) -> web.Response:
    alerts = request.app[SERVING].alerts
    return web.json_response({"open": alerts.open_alerts(), "alerts": alerts.recent()})


async def _monitor(request: web.Request) -> web.Response:
    return web.json_response(monitor_doc(request.app[SERVING]))


async def _dashboard(request: web.Request) -> web.Response:
    try:
        page = DASHBOARD.read_bytes()
    except OSError:
        return web.json_response(
            {"error": f"dashboard page missing from the install ({DASHBOARD})"}, status=404
        )
    return web.Response(
        body=page, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-cache"}
    )


async def _reload(request: web.Request) -> web.Response:
    result = await request.app[SERVING].reload("admin API")
    return web.json_response(result, status=200 if result["outcome"] != "error" else 422)


def _controller(request: web.Request) -> Any:
    serving = request.app[SERVING]
    name = request.match_info["name"]
    mp = serving.plan.models.get(name)
    if mp is None:
        raise web.HTTPNotFound(
            text=f'{{"error": "model {name!r} is not served"}}', content_type="application/json"
        )
    controller = serving.controllers.get(name)
    if controller is None:
        raise web.HTTPConflict(
            text=(
                f'{{"error": "model {name} has no canary rollout (mode = {mp.config.mode}); promote and'
                ' rollback act on a canary whose weights name stable and one canary version"}'
            ),
            content_type="application/json",
        )
    return controller


async def _promote(request: web.Request) -> web.Response:
    c = _controller(request)
    c.promote(cause="promoted by hand (admin API)")
    return web.json_response(c.describe(request.app[SERVING].loop_time()))


async def _rollback(request: web.Request) -> web.Response:
    c = _controller(request)
    c.rollback(cause="rolled back by hand (admin API)")
    return web.json_response(c.describe(request.app[SERVING].loop_time()))


def create_admin_app(serving: Serving, registry: Registry | None = None) -> web.Application:
    app = web.Application()
    app[SERVING] = serving
    app[REGISTRY] = (
        registry
        if registry is not None
        else create_registry(lambda: snapshot(serving), lambda: monitor_snapshot(serving))
    )
    app.router.add_get("/admin/status", _status)
    app.router.add_get("/admin/alerts", _alerts)
    app.router.add_get("/admin/monitor", _monitor)
    app.router.add_get("/dashboard", _dashboard)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/admin/reload", mutation_guard(serving, _reload))
    app.router.add_post("/admin/models/{name}/promote", mutation_guard(serving, _promote))
    app.router.add_post("/admin/models/{name}/rollback", mutation_guard(serving, _rollback))
    return app
