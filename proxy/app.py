"""The data plane: Open Inference Protocol endpoints on aiohttp's low-level server."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from . import __version__
from .config import Config
from .errors import (
    InvalidInputError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ProxyError,
)
from .plan import ModelPlan, Plan, StatsBook, close_plan, create_plan, start_plan
from .protocol import BINARY_HEADER, encode_infer_response, parse_infer_request
from .routing import Route
from .runner import Runners

log = logging.getLogger("mlproxy")
JSON = "application/json"
Handler = Callable[..., Awaitable[web.StreamResponse]]


@dataclass
class Serving:
    """What the data and admin planes share: the plan in force and what outlives plans."""

    plan: Plan
    stats: StatsBook
    runners: Runners
    http: aiohttp.ClientSession
    rng: random.Random = field(default_factory=random.Random)
    inflight: int = 0
    shed: int = 0
    last_error: str | None = None

    @property
    def config(self) -> Config:
        return self.plan.config


async def create_serving(
    config: Config, *, rng: random.Random | None = None, onnx_threads: int = 2
) -> Serving:
    """Build the run threads, the shared HTTP client and the first plan; the caller closes it."""
    runners = Runners.create(onnx_threads)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    stats = StatsBook()
    try:
        plan = await create_plan(config, runners=runners, http=http, stats=stats)
    except BaseException:
        await http.close()
        runners.close()
        raise
    start_plan(plan)
    return Serving(plan, stats, runners, http, rng or random.Random())


async def close_serving(serving: Serving) -> None:
    await close_plan(serving.plan)
    await serving.http.close()
    serving.runners.close()


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type=JSON, headers=headers)


def error_response(exc: ProxyError) -> web.Response:
    return _json({"error": exc.message}, status=exc.status, headers=exc.headers() or None)


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole body, or PayloadTooLargeError as soon as it passes `limit` bytes."""
    length = request.content_length
    if length is not None:
        if length > limit:
            raise PayloadTooLargeError(limit)
        return await request.content.read() if length else b""
    chunks = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class DataPlane:
    """Routes /v2/... requests; one handler for the whole server, no router or middleware."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        s = self.serving
        if s.inflight >= s.config.limits.max_inflight:
            s.shed += 1
            return error_response(
                OverloadedError(
                    f"{s.inflight} requests in flight (limits.max_inflight = {s.config.limits.max_inflight})"
                )
            )
        s.inflight += 1
        try:
            return await self._dispatch(request)
        except ProxyError as exc:
            return error_response(exc)
        except Exception:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            return _json({"error": "internal error; the proxy logged the details"}, status=500)
        finally:
            s.inflight -= 1

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")
        method = request.method
        if not parts or parts[0] != "v2":
            raise NotFoundError(f"no route for {request.path}; the API lives under /v2")
        n = len(parts)
        if n >= 3 and parts[1] == "models":
            name = parts[2]
            if n == 4 and parts[3] == "infer":
                _allow(request, ("POST",))
                return await self._infer(request, name, None)
            if n == 6 and parts[3] == "versions" and parts[5] == "infer":
                _allow(request, ("POST",))
                return await self._infer(request, name, parts[4])
            if n == 3:
                _allow(request, ("GET",))
                return _json(self._model_metadata(name, None))
            if n == 4 and parts[3] == "ready":
                _allow(request, ("GET",))
                self._model(name)
                return _json({"name": name, "ready": True})
            if n == 5 and parts[3] == "versions":
                _allow(request, ("GET",))
                return _json(self._model_metadata(name, parts[4]))
            if n == 6 and parts[3] == "versions" and parts[5] == "ready":
                _allow(request, ("GET",))
                self._backend(self._model(name), parts[4])
                return _json({"name": name, "version": parts[4], "ready": True})
            if n == 4 and parts[3] == "feedback":
                _allow(request, ("POST",))
                self._model(name)
                return _json(
                    {"error": "feedback (concept drift) is not implemented in this release"},
                    status=501,
                )
        elif n == 1:
            _allow(request, ("GET",))
            return _json(
                {"name": "mlproxy", "version": __version__, "extensions": ["binary_tensor_data"]}
            )
        elif n == 3 and parts[1] == "health" and parts[2] in ("live", "ready"):
            _allow(request, ("GET",))
            return _json({"live": True} if parts[2] == "live" else {"ready": True})
        raise NotFoundError(f"no route for {method} {request.path}")

    def _model(self, name: str) -> ModelPlan:
        plan = self.serving.plan
        mp = plan.models.get(name)
        if mp is None:
            raise ModelNotFoundError(name, known=list(plan.models))
        return mp

    @staticmethod
    def _backend(mp: ModelPlan, version: str) -> Any:
        b = mp.backends.get(version)
        if b is None:
            raise ModelNotFoundError(mp.name, version, known=list(mp.backends))
        return b

    def _model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        mp = self._model(name)
        v = version or mp.config.stable
        b = self._backend(mp, v)
        meta = b.metadata()
        doc: dict[str, Any] = {
            "name": name,
            "versions": list(mp.backends) if version is None else [v],
            "platform": meta.pop("platform"),
            "inputs": meta.pop("inputs"),
            "outputs": meta.pop("outputs"),
        }
        if version is None:
            doc["parameters"] = {
                "mode": mp.config.mode,
                "stable": mp.config.stable,
                "split": mp.strategy.split(),
            }
        else:
            doc["parameters"] = meta
        return doc

    async def _infer(
        self, request: web.BaseRequest, name: str, version: str | None
    ) -> web.StreamResponse:
        s = self.serving
        mp = self._model(name)
        if version is not None:
            self._backend(mp, version)
            route = Route(version)
        else:
            sticky = request.headers.get(mp.config.sticky_key) if mp.config.sticky_key else None
            strategy = mp.strategy
            route = strategy.choose(
                sticky, s.rng.random(), s.rng.random() if strategy.mirrors else 1.0
            )
        backend = mp.backends[route.primary]
        body = await read_body(request, s.config.server.max_body_bytes)
        header_length = None
        raw_hl = request.headers.get(BINARY_HEADER)
        if raw_hl is not None:
            try:
                header_length = int(raw_hl)
            except ValueError:
                raise InvalidInputError(
                    f"Inference-Header-Content-Length must be an integer, not {raw_hl!r}"
                ) from None
        req = parse_infer_request(body, backend.input, header_length=header_length)
        stats = mp.stats[route.primary]
        stats.requests += 1
        stats.rows += req.x.shape[0]
        start = perf_counter()  # uvloop's loop.time() ticks in whole milliseconds
        try:
            outputs = await backend.infer(req.x)
        except BaseException:
            stats.errors += 1
            raise
        payload, hlen = encode_infer_response(
            request_id=req.id,
            model=name,
            version=route.primary,
            outputs=outputs,
            requested=req.outputs,
            binary_outputs=req.binary_outputs,
        )
        stats.latency.observe(perf_counter() - start)
        for m in route.mirrors:
            mp.lanes[m].offer(req.x, outputs)
        headers = {"x-model-version": route.primary}
        if hlen is None:
            return web.Response(body=payload, content_type=JSON, headers=headers)
        headers[BINARY_HEADER] = str(hlen)
        return web.Response(body=payload, content_type="application/octet-stream", headers=headers)


def _allow(request: web.BaseRequest, methods: tuple[str, ...]) -> None:
    if request.method not in methods:
        raise MethodNotAllowedError(request.method, request.path, methods)


def create_data_server(serving: Serving) -> web.Server:
    """The low-level aiohttp server for the data plane (no router, no access log)."""
    plane = DataPlane(serving)
    return web.Server(plane.handle, access_log=None)
