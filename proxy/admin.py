"""The admin plane on its own port: status, metrics, alerts, reload, promote and rollback."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .backends import LocalBackend
from .monitor.metrics import CONTENT_TYPE, Registry, Snapshot, VersionView, create_registry, render
from .serving import Serving

SERVING = web.AppKey("serving", Serving)
REGISTRY = web.AppKey("registry", Registry)
log = logging.getLogger("mlproxy.admin")
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
        alerts=len(serving.alerts.list()),
    )


def status(serving: Serving) -> dict[str, Any]:
    plan = serving.plan
    models: dict[str, Any] = {}
    now = serving.loop_time()
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
                    "run_cost_us": {
                        f"{1 << k}-{(2 << k) - 1}": round(c * 1e6, 1)
                        for k, c in enumerate(bs.run_cost_s)
                        if c is not None
                    },
                    "queue_depth": backend.batcher.queue_depth,
                    "shed": bs.shed,
                }
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
        "alerts": len(serving.alerts.list()),
        "models": models,
    }


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
    return web.json_response({"alerts": request.app[SERVING].alerts.list()})


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
    app[REGISTRY] = registry if registry is not None else create_registry(lambda: snapshot(serving))
    app.router.add_get("/admin/status", _status)
    app.router.add_get("/admin/alerts", _alerts)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/admin/reload", mutation_guard(serving, _reload))
    app.router.add_post("/admin/models/{name}/promote", mutation_guard(serving, _promote))
    app.router.add_post("/admin/models/{name}/rollback", mutation_guard(serving, _rollback))
    return app
