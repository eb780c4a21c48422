"""The data plane: Open Inference Protocol endpoints on aiohttp's low-level server."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

import orjson
from aiohttp import web

from proxy import __version__
from proxy.config.schema import VersionKey
from proxy.engine.counters import Counters, Refusal
from proxy.engine.stats import VersionStats
from proxy.errors import (
    InvalidInputError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NonFiniteInputError,
    NotFoundError,
    OverloadedError,
    ProxyError,
)
from proxy.http.body import read_body
from proxy.http.connection import HEALTH_PREFIX
from proxy.http.refusals import HEALTH_DOCS
from proxy.http.transport import DataServer
from proxy.models.backends import Backend
from proxy.monitoring.watch import Watch
from proxy.protocol.codec import (
    BINARY_HEADER,
    encode_infer_response,
    parse_infer_request,
    parse_json_object,
)
from proxy.protocol.feedback import parse_feedback
from proxy.protocol.ids import RequestIds
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


class DataPlane:
    """Routes /v2/... requests; one handler for the whole server, no router or middleware."""

    def __init__(
        self,
        *,
        current: Current,
        counters: Counters,
        watch: Watch,
        rng: random.Random,
        ids: RequestIds,
    ) -> None:
        self._current = current
        self._counters = counters
        self._watch = watch
        self._rng = rng
        self._ids = ids

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        current = self._current
        limit = current.plan.config.limits.max_inflight
        # Admission happened on the connection (http/connection.py); this catches what it lets
        # by: requests pipelined behind another on one connection. Probes are never shed.
        if current.inflight >= limit and not request.path.startswith(HEALTH_PREFIX):
            self._counters.shed()
            return error_response(
                OverloadedError(
                    f"{current.inflight} requests in flight (limits.max_inflight = {limit})"
                )
            )
        plan = current.enter()  # the request finishes on this plan, whatever a reload does
        resp: web.StreamResponse
        try:
            resp = await self._dispatch(request, plan)
        except ProxyError as exc:
            resp = error_response(exc)
        except ConnectionError:
            # The client left mid-request (its body cut short): a count, not a traceback. The
            # answer goes nowhere; aiohttp sees the closed transport and drops the connection.
            self._counters.refused(Refusal.CLIENT_DISCONNECTED)
            resp = _json({"error": "the client disconnected"}, status=400)
        except Exception:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            resp = _json({"error": "internal error; the proxy logged the details"}, status=500)
        finally:
            current.leave(plan)
            done = getattr(request.protocol, "request_done", None)  # our connections' slot
            if done is not None:
                done()
        if current.draining:
            resp.force_close()  # the client must not send another request on this connection
        return resp

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
                # Not ready: 503, so that clients reading only the status (tritonclient's
                # is_model_ready, Kubernetes probes) see it; the body says it too.
                ready = self._model(plan, name).ready()
                return _json({"name": name, "ready": ready}, status=200 if ready else 503)
            if n == 5 and parts[3] == "versions":
                _allow(request, ("GET",))
                return _json(self._model_metadata(plan, name, parts[4]))
            if n == 6 and parts[3] == "versions" and parts[5] == "ready":
                _allow(request, ("GET",))
                ready = self._backend(self._model(plan, name), parts[4]).available
                doc = {"name": name, "version": parts[4], "ready": ready}
                return _json(doc, status=200 if ready else 503)
            if n == 4 and parts[3] == "feedback":
                _allow(request, ("POST",))
                return await self._feedback(request, plan, name)
        elif n == 1:
            _allow(request, ("GET",))
            return _json(
                {"name": "mlproxy", "version": __version__, "extensions": ["binary_tensor_data"]}
            )
        elif n == 3 and parts[1] == "health" and parts[2] in HEALTH_DOCS:
            _allow(request, ("GET",))
            return _json(HEALTH_DOCS[parts[2]])
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
        feedback = parse_feedback(doc, self._watch.truths(name))
        joined = self._watch.join(name, feedback.id, feedback.truth)
        return _json(
            {
                "id": feedback.id,
                "model_name": name,
                "model_version": joined.version,
                "rows": joined.rows,
            }
        )

    async def _infer(
        self, request: web.BaseRequest, plan: Plan, name: str, version: str | None
    ) -> web.StreamResponse:
        mp, route = self._route(plan, name, version, request.headers.get)
        body = await read_body(request, plan.config.server.max_body_bytes)
        hlen = _binary_header_length(request.headers.get(BINARY_HEADER))
        payload, answered, json_length = await self._run(mp, route, version, body, hlen)
        return _infer_response(payload, answered, json_length)

    async def handle_raw(
        self, name: str, version: str | None, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes, list[tuple[str, str]]]:
        """An infer request that the connection read whole from its raw bytes (the fast path,
        `http/connection.py`): (status, body, headers besides Content-Type/Length), the same
        answer `handle` gives, without aiohttp's request or response objects. `headers` are
        keyed in lower case. Never raises."""
        current = self._current
        plan = current.enter()
        try:
            get = lambda key: headers.get(key.lower())  # noqa: E731
            mp, route = self._route(plan, name, version, get)
            hlen = _binary_header_length(headers.get(BINARY_HEADER))
            payload, answered, json_length = await self._run(mp, route, version, body, hlen)
        except ProxyError as exc:
            extra = [("Content-Type", JSON), *exc.headers().items()]
            return exc.status, orjson.dumps({"error": exc.message}), extra
        except Exception:
            log.exception("unhandled error serving POST /v2/models/%s/infer", name)
            error = {"error": "internal error; the proxy logged the details"}
            return 500, orjson.dumps(error), [("Content-Type", JSON)]
        finally:
            current.leave(plan)
        return 200, payload, _infer_headers(answered, json_length)

    def _route(
        self, plan: Plan, name: str, version: str | None, header: Callable[[str], str | None]
    ) -> tuple[ModelPlan, Route]:
        """The model and the versions that serve this request (a pinned one, or the strategy's
        choice by the sticky header)."""
        mp = self._model(plan, name)
        if version is not None:
            self._backend(mp, version)
            return mp, Route(version)
        sticky = header(mp.config.sticky_key) if mp.config.sticky_key else None
        strategy = mp.strategy
        rng = self._rng
        return mp, strategy.choose(sticky, rng.random(), rng.random() if strategy.mirrors else 1.0)

    async def _run(
        self, mp: ModelPlan, route: Route, version: str | None, body: bytes, hlen: int | None
    ) -> tuple[bytes, str, int | None]:
        """Decode, run, fall back, record: (the answer's body, the version that answered, the
        JSON header's length if any output is binary)."""
        name = mp.name
        backend = mp.backends[route.primary]
        try:
            req = parse_infer_request(body, backend.input, ids=self._ids, header_length=hlen)
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
        payload, json_length = encode_infer_response(
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
        return payload, answered, json_length

    def _fallback(
        self, mp: ModelPlan, failed: str, exc: Exception, *, pinned: str | None
    ) -> str | None:
        """The version that answers when `failed` could not: stable, unless the request was
        pinned, stable itself failed or is unavailable (a remote ejected or not answering: it
        would refuse at once), or the failure was shedding (no reason to add load elsewhere).
        None: the failure is the answer. A version that is unavailable fails at once, so its
        share of the traffic goes to stable without waiting, counted as fallbacks."""
        stable = mp.config.stable
        if (
            pinned is not None
            or failed == stable
            or stable not in mp.backends
            or not mp.backends[stable].available
            or isinstance(exc, OverloadedError)
        ):
            return None
        # A canary (or green, or shadow primary) failed: the proven version answers instead.
        # Logged once per interval per version, with the count (a failing canary fails often).
        self._counters.fallback(VersionKey(mp.name, failed))
        n = mp.fallback_log.hit(failed)
        if n == 1:
            log.warning(
                "%s/%s failed a request (%s); %s answers instead", mp.name, failed, exc, stable
            )
        elif n is not None:
            log.warning(
                "%s/%s failed %d requests since the last such message (last: %s); %s answered them",
                mp.name,
                failed,
                n,
                exc,
                stable,
            )
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


def _infer_headers(answered: str, json_length: int | None) -> list[tuple[str, str]]:
    """An infer answer's headers, besides Content-Length (both paths send these)."""
    if json_length is None:
        return [("Content-Type", JSON), ("x-model-version", answered)]
    return [
        ("Content-Type", "application/octet-stream"),
        ("x-model-version", answered),
        (BINARY_HEADER, str(json_length)),
    ]


def _infer_response(payload: bytes, answered: str, json_length: int | None) -> web.Response:
    return web.Response(body=payload, headers=dict(_infer_headers(answered, json_length)))


def _binary_header_length(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidInputError(
            f"Inference-Header-Content-Length must be an integer, not {raw!r}"
        ) from None


def _allow(request: web.BaseRequest, methods: tuple[str, ...]) -> None:
    if request.method not in methods:
        raise MethodNotAllowedError(request.method, request.path, methods)


def create_data_plane(serving: Serving) -> DataPlane:
    """The data plane, handed the five parts of `serving` it uses."""
    return DataPlane(
        current=serving.current,
        counters=serving.counters,
        watch=serving.watch,
        rng=serving.rng,
        ids=serving.ids,
    )


def create_data_server(serving: Serving) -> DataServer:
    """The low-level aiohttp server for the data plane (no router, no access log), with
    admission, timeouts and connection limits on its connections."""
    plane = create_data_plane(serving)
    return DataServer(
        plane.handle,
        raw=plane.handle_raw,
        current=serving.current,
        counters=serving.counters,
        admission=serving.admission,
    )
