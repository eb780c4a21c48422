"""The admin plane on its own port: status, metrics, alerts, reload, promote and rollback."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from proxy.config.schema import AdminConfig
from proxy.http.metrics import CONTENT_TYPE, Registry, create_registry, render
from proxy.http.views import AdminState, monitor_doc, monitor_snapshot, snapshot, status
from proxy.routing.rollout import RolloutController

SERVING = web.AppKey("serving", AdminState)
REGISTRY = web.AppKey("registry", Registry)
log = logging.getLogger("mlproxy.admin")
DASHBOARD = Path(__file__).with_name("dashboard.html")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def mutation_guard(admin: AdminConfig, handler: Handler) -> Handler:
    """POST /admin/* needs the bearer token when [admin] token_env names a set variable; with
    no token, mutations are allowed only while the admin plane listens on loopback. `admin` is
    the [admin] table the plane was started with: a reload changes it only at the next restart,
    so the guard follows where the plane really listens."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        token = os.environ.get(admin.token_env, "")
        if token:
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {token}"
            # surrogateescape: a header that is not UTF-8 is compared as the bytes it was
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode()):
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
    return web.json_response(
        {
            "open": [a.to_json() for a in alerts.open_alerts()],
            "alerts": [a.to_json() for a in alerts.recent()],
        }
    )


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
    result = await request.app[SERVING].reloader.reload("admin API")
    return web.json_response(result, status=200 if result["outcome"] != "error" else 422)


def _controller(request: web.Request) -> RolloutController:
    serving = request.app[SERVING]
    name = request.match_info["name"]
    mp = serving.plan.models.get(name)
    if mp is None:
        raise web.HTTPNotFound(
            text=f'{{"error": "model {name!r} is not served"}}', content_type="application/json"
        )
    controller = serving.rollouts.get(name)
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
    return web.json_response(c.describe(asyncio.get_running_loop().time()))


async def _rollback(request: web.Request) -> web.Response:
    c = _controller(request)
    c.rollback(cause="rolled back by hand (admin API)")
    return web.json_response(c.describe(asyncio.get_running_loop().time()))


def create_admin_app(serving: AdminState, registry: Registry | None = None) -> web.Application:
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
    app.router.add_post("/admin/reload", mutation_guard(serving.config.admin, _reload))
    app.router.add_post(
        "/admin/models/{name}/promote", mutation_guard(serving.config.admin, _promote)
    )
    app.router.add_post(
        "/admin/models/{name}/rollback", mutation_guard(serving.config.admin, _rollback)
    )
    return app
