"""The data plane: Open Inference Protocol endpoints on aiohttp's low-level server."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

import numpy as np
import orjson
from aiohttp import web
from aiohttp.http_exceptions import PayloadEncodingError

from proxy import __version__
from proxy.config.schema import VersionKey
from proxy.engine.counters import Counters
from proxy.engine.stats import VersionStats
from proxy.errors import (
    InvalidInputError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NonFiniteInputError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ProxyError,
)
from proxy.models.backends import Backend
from proxy.monitoring.watch import Watch
from proxy.protocol.codec import (
    BINARY_HEADER,
    encode_infer_response,
    parse_infer_request,
    parse_json_object,
)
from proxy.routing.strategy import Route
from proxy.runtime.current import Current
from proxy.runtime.plan import ModelPlan, Plan
from proxy.runtime.serving import Serving

log = logging.getLogger("mlproxy")
JSON = "application/json"
Handler = Callable[..., Awaitable[web.StreamResponse]]


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type=JSON, headers=headers)


def error_response(exc: ProxyError) -> web.Response:
    return _json({"error": exc.message}, status=exc.status, headers=exc.headers() or None)


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole body, or PayloadTooLargeError as soon as it passes `limit` bytes; a body that
    does not decode in its Content-Encoding is the client's error (400), not ours."""
    try:
        return await _read_body(request, limit)
    except (PayloadEncodingError, web.RequestPayloadError):  # the parser's, or as the body sees it
        # The stream cannot be read past this point: the connection closes after the 400, and
        # the body counts as read, so aiohttp does not drain it (and log the error again).
        request.protocol.close()
        request.content.feed_eof()
        encoding = request.headers.get("Content-Encoding")
        if encoding:
            reason = f"is not valid data in its Content-Encoding ({encoding!r})"
        else:
            reason = "is malformed (its length or chunked framing does not hold)"
        raise InvalidInputError(f"the request body {reason}"[:200]) from None


async def _read_body(request: web.BaseRequest, limit: int) -> bytes:
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

    def __init__(
        self, *, current: Current, counters: Counters, watch: Watch, rng: random.Random
    ) -> None:
        self._current = current
        self._counters = counters
        self._watch = watch
        self._rng = rng

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        current = self._current
        limit = current.plan.config.limits.max_inflight
        if current.inflight >= limit:
            self._counters.shed()
            return error_response(
                OverloadedError(
                    f"{current.inflight} requests in flight (limits.max_inflight = {limit})"
                )
            )
        plan = current.enter()  # the request finishes on this plan, whatever a reload does
        try:
            return await self._dispatch(request, plan)
        except ProxyError as exc:
            return error_response(exc)
        except Exception:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            return _json({"error": "internal error; the proxy logged the details"}, status=500)
        finally:
            current.leave(plan)

    async def _dispatch(self, request: web.BaseRequest, plan: Plan) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")
        method = request.method
        if not parts or parts[0] != "v2":
            raise NotFoundError(f"no route for {request.path}; the API lives under /v2")
        n = len(parts)
        if n >= 3 and parts[1] == "models":
            name = parts[2]
            if n == 4 and parts[3] == "infer":
                _allow(request, ("POST",))
                return await self._infer(request, plan, name, None)
            if n == 6 and parts[3] == "versions" and parts[5] == "infer":
                _allow(request, ("POST",))
                return await self._infer(request, plan, name, parts[4])
            if n == 3:
                _allow(request, ("GET",))
                return _json(self._model_metadata(plan, name, None))
            if n == 4 and parts[3] == "ready":
                _allow(request, ("GET",))
                self._model(plan, name)
                return _json({"name": name, "ready": True})
            if n == 5 and parts[3] == "versions":
                _allow(request, ("GET",))
                return _json(self._model_metadata(plan, name, parts[4]))
            if n == 6 and parts[3] == "versions" and parts[5] == "ready":
                _allow(request, ("GET",))
                self._backend(self._model(plan, name), parts[4])
                return _json({"name": name, "version": parts[4], "ready": True})
            if n == 4 and parts[3] == "feedback":
                _allow(request, ("POST",))
                return await self._feedback(request, plan, name)
        elif n == 1:
            _allow(request, ("GET",))
            return _json(
                {"name": "mlproxy", "version": __version__, "extensions": ["binary_tensor_data"]}
            )
        elif n == 3 and parts[1] == "health" and parts[2] in ("live", "ready"):
            _allow(request, ("GET",))
            return _json({"live": True} if parts[2] == "live" else {"ready": True})
        raise NotFoundError(f"no route for {method} {request.path}")

    @staticmethod
    def _model(plan: Plan, name: str) -> ModelPlan:
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

    def _model_metadata(self, plan: Plan, name: str, version: str | None) -> dict[str, Any]:
        mp = self._model(plan, name)
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

    async def _feedback(
        self, request: web.BaseRequest, plan: Plan, name: str
    ) -> web.StreamResponse:
        """Ground truth for an earlier answer: {"id": <request id>, "label": <class or list>}."""
        mp = self._model(plan, name)
        if not mp.config.drift.enabled:
            raise InvalidInputError(
                f"monitoring is off for {name} (models.{name}.drift.enabled = false)"
            )
        doc = parse_json_object(await read_body(request, plan.config.server.max_body_bytes))
        rid = doc.get("id")
        if not isinstance(rid, str) or not rid:
            raise InvalidInputError('"id" must be the id of an earlier inference request')
        key = "label" if "label" in doc else "value"
        if key not in doc:
            raise InvalidInputError(
                '"label" is missing: the true class (or, for a regression model, the true'
                " value) of each row of that request"
            )
        joined = self._watch.join(name, rid, _truth(doc[key], key))
        return _json(
            {"id": rid, "model_name": name, "model_version": joined.version, "rows": joined.rows}
        )

    async def _infer(
        self, request: web.BaseRequest, plan: Plan, name: str, version: str | None
    ) -> web.StreamResponse:
        mp = self._model(plan, name)
        if version is not None:
            self._backend(mp, version)
            route = Route(version)
        else:
            sticky = request.headers.get(mp.config.sticky_key) if mp.config.sticky_key else None
            strategy = mp.strategy
            rng = self._rng
            route = strategy.choose(sticky, rng.random(), rng.random() if strategy.mirrors else 1.0)
        backend = mp.backends[route.primary]
        body = await read_body(request, plan.config.server.max_body_bytes)
        try:
            req = parse_infer_request(
                body, backend.input, header_length=_binary_header_length(request)
            )
        except NonFiniteInputError:
            self._counters.nonfinite(name)
            raise
        # Each version records its own part: a failed one its failure and its time to fail, the
        # answering one the request it answered (with its latency, after encoding, below).
        rows = req.x.shape[0]
        stats = mp.stats[route.primary]
        stats.started(rows)
        started = perf_counter()  # uvloop's loop.time() ticks in whole milliseconds
        answered = route.primary
        try:
            outputs = await backend.infer(req.x)
        except Exception as exc:
            stats.failed(perf_counter() - started)
            fallback = self._fallback(mp, route.primary, exc, pinned=version)
            if fallback is None:
                raise
            answered = fallback
            outputs, started = await _answer(mp.stats[answered], mp.backends[answered], req.x, rows)
        payload, hlen = encode_infer_response(
            request_id=req.id,
            model=name,
            version=answered,
            outputs=outputs,
            requested=req.outputs,
            binary_outputs=req.binary_outputs,
        )
        mp.stats[answered].answered(perf_counter() - started)
        if answered == route.primary:
            for m in route.mirrors:
                mp.lanes[m].offer(req.x, outputs)
        if mp.config.drift.enabled:
            self._watch.remember(name, req.id, answered, outputs, req.seq)
        headers = {"x-model-version": answered}
        if hlen is None:
            return web.Response(body=payload, content_type=JSON, headers=headers)
        headers[BINARY_HEADER] = str(hlen)
        return web.Response(body=payload, content_type="application/octet-stream", headers=headers)

    def _fallback(
        self, mp: ModelPlan, failed: str, exc: Exception, *, pinned: str | None
    ) -> str | None:
        """The version that answers when `failed` could not: stable, unless the request was
        pinned, stable itself failed, or the failure was shedding (no reason to add load
        elsewhere). None: the failure is the answer."""
        stable = mp.config.stable
        if (
            pinned is not None
            or failed == stable
            or stable not in mp.backends
            or isinstance(exc, OverloadedError)
        ):
            return None
        # A canary (or green, or shadow primary) failed: the proven version answers instead.
        log.warning("%s/%s failed a request (%s); %s answers instead", mp.name, failed, exc, stable)
        self._counters.fallback(VersionKey(mp.name, failed))
        return stable


async def _answer(
    stats: VersionStats, backend: Backend, x: Any, rows: int
) -> tuple[dict[str, Any], float]:
    """The fallback's run, counted on the version that runs it: (outputs, when it started)."""
    stats.started(rows)
    start = perf_counter()
    try:
        return await backend.infer(x), start
    except Exception:
        stats.failed(perf_counter() - start)
        raise


def _binary_header_length(request: web.BaseRequest) -> int | None:
    raw = request.headers.get(BINARY_HEADER)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidInputError(
            f"Inference-Header-Content-Length must be an integer, not {raw!r}"
        ) from None


def _truth(value: Any, key: str) -> np.ndarray[Any, Any]:
    """Ground truth from a feedback body: a number, or a flat list of them (one per row).
    Integers (classes) stay integers; other numbers (regression values) become float64."""
    try:
        arr = np.asarray(value)
    except ValueError:
        raise InvalidInputError(f"{key} must be a number or a flat list of numbers") from None
    if arr.dtype.kind not in "iubf" or arr.ndim > 1 or arr.size == 0:
        raise InvalidInputError(
            f"{key} must be a number or a flat list of numbers, one per row, not {value!r}"[:200]
        )
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InvalidInputError(f"{key} holds NaN or infinite values")
        return arr.reshape(-1).astype(np.float64)
    return arr.reshape(-1).astype(np.int64)


def _allow(request: web.BaseRequest, methods: tuple[str, ...]) -> None:
    if request.method not in methods:
        raise MethodNotAllowedError(request.method, request.path, methods)


def create_data_plane(serving: Serving) -> DataPlane:
    """The data plane, handed the four parts of `serving` it uses."""
    return DataPlane(
        current=serving.current, counters=serving.counters, watch=serving.watch, rng=serving.rng
    )


def create_data_server(serving: Serving) -> web.Server:
    """The low-level aiohttp server for the data plane (no router, no access log)."""
    return web.Server(create_data_plane(serving).handle, access_log=None)
