"""The admin plane: /admin/status, /metrics (its own port, never on the data plane)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .app import Serving
from .backends import LocalBackend
from .monitor.metrics import CONTENT_TYPE, Registry, Snapshot, VersionView, create_registry, render

SERVING = web.AppKey("serving", Serving)
REGISTRY = web.AppKey("registry", Registry)


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
                VersionView(mp.name, v, backend.kind, split.get(v, 0.0), mp.stats[v], **extra)
            )
    return Snapshot(views, serving.inflight, serving.shed, plan.loaded_at)


def status(serving: Serving) -> dict[str, Any]:
    plan = serving.plan
    models: dict[str, Any] = {}
    for mp in plan.models.values():
        split = mp.strategy.split()
        versions: dict[str, Any] = {}
        for v, backend in mp.backends.items():
            doc = mp.stats[v].summary()
            doc["kind"] = backend.kind
            doc["weight"] = split.get(v, 0.0)
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
        models[mp.name] = {
            "mode": mp.config.mode,
            "stable": mp.config.stable,
            "weights": split,
            "mirrors": list(mp.strategy.mirrors),
            "versions": versions,
        }
    return {
        "config": {
            "source": plan.config.source,
            "digest": plan.config.digest,
            "loaded_at": plan.loaded_at,
            "last_error": serving.last_error,
        },
        "inflight": serving.inflight,
        "shed": serving.shed,
        "models": models,
    }


async def _status(request: web.Request) -> web.Response:
    return web.json_response(status(request.app[SERVING]))


async def _metrics(request: web.Request) -> web.Response:
    body = render(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def create_admin_app(serving: Serving, registry: Registry | None = None) -> web.Application:
    app = web.Application()
    app[SERVING] = serving
    app[REGISTRY] = registry if registry is not None else create_registry(lambda: snapshot(serving))
    app.router.add_get("/admin/status", _status)
    app.router.add_get("/metrics", _metrics)
    return app
