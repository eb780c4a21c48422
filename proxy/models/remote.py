"""A model on another Open Inference Protocol server, called safely: availability probed, a
circuit breaker, a bounded connection pool, per-try timeouts and a retry budget.

Health is not config: a server that does not answer its metadata call is loaded *unavailable*
(its calls refused at once, 503) and probed in the background until it answers metadata that
fits the model. Metadata that answers but is not Open Inference Protocol, or does not fit, is a
config error at load (refused) and keeps the version unavailable when a probe finds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import aiohttp
import numpy as np
import orjson

from proxy.config.schema import VersionConfig
from proxy.engine.breaker import Breaker, RetryBudget
from proxy.errors import ModelLoadError, ProxyError, UpstreamError, UpstreamTimeoutError
from proxy.models.manifest import Manifest, parse_baseline_manifest
from proxy.protocol.codec import (
    TensorSpec,
    decode_infer_response,
    encode_infer_request,
    parse_tensor_specs,
)

Array = np.ndarray[Any, Any]
log = logging.getLogger("mlproxy.backends")
# The circuit breaker: this many failed or timed-out calls in a row eject the version (calls
# refused at once, so fallback to stable does not wait), for this long; then one trial call
# closes it or ejects it again. A hung upstream costs about BREAKER_FAILURES timeouts (plus the
# calls already in flight), then one per BREAKER_PAUSE_S.
BREAKER_FAILURES = 5
BREAKER_PAUSE_S = 5.0
# Connections per remote version, each version its own pool: a hung upstream holds at most these
# sockets, and calls waiting for one time out within their timeout_ms.
POOL_CONNECTIONS = 64
# Retries (only after a failed connection, when nothing was sent) are at most RETRY_RATIO of
# the calls plus RETRY_FLOOR_PER_S a second, banked up to RETRY_CAP: no retry storms.
RETRY_RATIO = 0.1
RETRY_FLOOR_PER_S = 1.0
RETRY_CAP = 10.0
# A version that did not answer its metadata is probed after PROBE_FIRST_S, then at doubling
# intervals up to PROBE_MAX_S; a metadata call waits max(timeout_ms, PROBE_TIMEOUT_S).
PROBE_FIRST_S = 1.0
PROBE_MAX_S = 30.0
PROBE_TIMEOUT_S = 2.0
_JSON_HEADERS = {"Content-Type": "application/json"}


class UpstreamUnavailableError(UpstreamError):
    """A remote version is not called: its metadata never answered (or did not fit the model),
    or its breaker is open after failures in a row. Refused at once, 503 with Retry-After."""

    status = 503

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, math.ceil(retry_after_s or PROBE_FIRST_S))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class _NoAnswer(Exception):
    """The metadata call got no usable answer (no connection, a timeout, a non-200): a matter of
    the upstream's health, not of the config."""


@dataclass(frozen=True, slots=True)
class _Schema:
    """What a remote version's metadata says it takes and answers."""

    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    platform: str


@dataclass(frozen=True, slots=True)
class UpstreamHealth:
    """A remote version's health as /admin/status shows it (read, never judged, by readers)."""

    url: str
    # "unavailable" (metadata not answered or not fitting), or the breaker's state
    state: str
    problem: str | None  # why it is unavailable, or the last failed call
    failures_in_a_row: int
    breaker_opened: int  # times the breaker opened (ejections)
    retry_in_s: float | None  # until the next trial call (open breaker)
    ejected: int  # calls refused at once, the upstream not called
    retries: int  # retries granted after a failed connection
    retries_denied: int  # retries the retry budget refused

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        if self.retry_in_s is not None:
            doc["retry_in_s"] = round(self.retry_in_s, 3)
        return doc


class RemoteModel:
    """A model at `url` (.../v2/models/<name>) on another Open Inference Protocol server.

    Until its metadata has answered (and fits the model) it is unavailable: `call` refuses at
    once and a background task probes (`probe` is its step function). Then every call goes
    through a circuit breaker (BREAKER_FAILURES failures or timeouts in a row eject the version
    for BREAKER_PAUSE_S, then one trial call decides), over its own connection pool of
    POOL_CONNECTIONS (a hung upstream holds only its own sockets), with one retry after a failed
    connection (nothing was sent) while a RetryBudget allows.
    """

    def __init__(
        self,
        config: VersionConfig,
        *,
        probe_http: aiohttp.ClientSession,
        pool: aiohttp.ClientSession,
        clock: Callable[[], float],
    ) -> None:
        assert config.url is not None
        self.version = config.name
        self.url = config.url
        self.identity = config.url  # url#sha256 with a baseline (a changed file reloads it)
        self.manifest: Manifest | None = None
        self._baseline = config.baseline
        self._where = f"version {self.version} at {self.url}"
        self._probe_http = probe_http
        self._pool = pool
        self._timeout_s = config.timeout_ms / 1000.0
        self._timeout = aiohttp.ClientTimeout(total=self._timeout_s)
        self._probe_timeout = aiohttp.ClientTimeout(total=max(self._timeout_s, PROBE_TIMEOUT_S))
        self.breaker = Breaker(failures=BREAKER_FAILURES, pause_s=BREAKER_PAUSE_S, clock=clock)
        self.budget = RetryBudget(
            ratio=RETRY_RATIO, floor_per_s=RETRY_FLOOR_PER_S, cap=RETRY_CAP, clock=clock
        )
        self._schema: _Schema | None = None
        self._problem: str | None = None
        self._ejected = 0
        self._reference: Callable[[], TensorSpec | None] = lambda: None
        self._probe_lock = asyncio.Lock()
        self._prober: asyncio.Task[None] | None = None

    @classmethod
    async def create(
        cls, config: VersionConfig, http: aiohttp.ClientSession, clock: Callable[[], float]
    ) -> Self:
        """Ask for the metadata and read the baseline manifest: metadata that is not Open
        Inference Protocol, a bad baseline file, or one that does not fit the metadata is
        refused (ModelLoadError); no answer at all loads the version unavailable."""
        assert config.url is not None
        pool = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=POOL_CONNECTIONS, limit_per_host=POOL_CONNECTIONS)
        )
        backend = cls(config, probe_http=http, pool=pool, clock=clock)
        try:
            await backend._load(config.baseline)
        except BaseException:
            await pool.close()
            raise
        return backend

    async def _load(self, baseline: Path | None) -> None:
        try:
            schema: _Schema | None = _parse_schema(self.url, await self._fetch_metadata())
        except _NoAnswer as exc:
            schema, self._problem = None, str(exc)
        if baseline is not None:  # its features are checked here, or once the metadata answers
            features = 0 if schema is None else schema.input.shape[1]
            self.manifest, digest = await asyncio.get_running_loop().run_in_executor(
                None, _read_baseline, baseline, features
            )
            self.identity = f"{self.url}#{digest}"
        if schema is None:
            log.warning(
                "%s is unavailable (%s): loaded as unavailable, probed", self._where, self._problem
            )
        else:
            self._schema = schema

    async def _fetch_metadata(self) -> dict[str, Any]:
        try:
            async with self._probe_http.get(self.url, timeout=self._probe_timeout) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise _NoAnswer(f"metadata call answered HTTP {resp.status}: {body[:200]!r}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _NoAnswer(f"metadata call failed: {type(exc).__name__}: {exc}") from None
        try:
            meta = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ModelLoadError(f"{self.url}: metadata is not JSON") from None
        if not isinstance(meta, dict):
            raise ModelLoadError(f"{self.url}: metadata is not a JSON object")
        return meta

    def _fit(self, schema: _Schema) -> None:
        """Take a probe's schema if it fits the baseline and the model's other versions."""
        spec, m = schema.input, self.manifest
        if m is not None and len(m.features) != spec.shape[1]:
            raise ModelLoadError(
                f"{self._baseline}: its baseline has {len(m.features)} features,"
                f" the remote model takes {spec.shape[1]}"
            )
        ref = self._reference()
        if ref is not None and (ref.shape[1] != spec.shape[1] or ref.name != spec.name):
            raise ModelLoadError(
                f"takes input {spec.to_json()}, but the model's other versions take"
                f" {ref.to_json()}; all versions of a model must take the same input"
            )
        self._schema = schema
        self._problem = None

    async def probe(self) -> bool:
        """The probe's step: one metadata call for a version not yet available. True once it
        answers metadata that fits the model (it then serves); a misfit is logged and shown,
        and the version stays unavailable."""
        async with self._probe_lock:
            if self._schema is not None:
                return True
            before = self._problem
            try:
                self._fit(_parse_schema(self.url, await self._fetch_metadata()))
            except _NoAnswer as exc:
                self._problem = str(exc)
                if self._problem != before:
                    log.warning("%s is still unavailable: %s", self._where, exc)
                return False
            except ModelLoadError as exc:
                self._problem = f"metadata does not fit: {exc}"
                if self._problem != before:
                    log.error("%s answers, but stays unavailable: %s", self._where, self._problem)
                return False
            log.info("%s answers its metadata: available", self._where)
            return True

    async def _probe_until_available(self) -> None:
        delay = PROBE_FIRST_S
        while True:
            await asyncio.sleep(delay)  # a timer between probes, not a synchronisation
            if await self.probe():
                return
            delay = min(delay * 2, PROBE_MAX_S)

    def start(self) -> None:
        if self._schema is None and (self._prober is None or self._prober.done()):
            self._prober = asyncio.get_running_loop().create_task(
                self._probe_until_available(), name=f"probe-{self.version}"
            )

    def expect(self, reference: Callable[[], TensorSpec | None]) -> None:
        self._reference = reference

    @property
    def input(self) -> TensorSpec:
        """The declared input; while unknown, the model's (requests are parsed as the other
        versions take them, then refused or answered by stable)."""
        if self._schema is not None:
            return self._schema.input
        ref = self._reference()
        if ref is None:
            raise self._refusal()
        return ref

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return () if self._schema is None else self._schema.outputs

    def known_input(self) -> TensorSpec | None:
        return None if self._schema is None else self._schema.input

    @property
    def available(self) -> bool:
        return self._schema is not None and not self.breaker.is_open()

    def health(self) -> UpstreamHealth:
        b = self.breaker
        return UpstreamHealth(
            url=self.url,
            state="unavailable" if self._schema is None else str(b.state()),
            problem=self._problem,
            failures_in_a_row=b.failures_in_a_row,
            breaker_opened=b.opened_total,
            retry_in_s=b.retry_in(),
            ejected=self._ejected,
            retries=self.budget.retried,
            retries_denied=self.budget.denied,
        )

    def _refusal(self) -> UpstreamUnavailableError:
        if self._schema is None:
            return UpstreamUnavailableError(
                f"{self._where} is unavailable ({self._problem})", PROBE_FIRST_S
            )
        return UpstreamUnavailableError(
            f"{self._where} is ejected after {self.breaker.failures_in_a_row} failed calls in a"
            f" row (last: {self._problem}); the next trial call is in"
            f" {self.breaker.retry_in() or 0:.1f} s",
            self.breaker.retry_in(),
        )

    async def call(self, x: Array) -> dict[str, Array]:
        """One inference call through the breaker; UpstreamUnavailableError at once while the
        version is unavailable or ejected."""
        if self._schema is None or not self.breaker.allow():
            self._ejected += 1
            raise self._refusal()
        try:
            outputs = await self._send(x, self._schema.input)
        except _Refused as exc:  # the upstream answered (4xx): it is up, the call was wrong
            self.breaker.success()
            raise exc.error from None
        except ProxyError as exc:
            self._problem = exc.message
            if self.breaker.failure():
                log.warning(
                    "%s ejected for %.1f s after %d failed calls in a row (last: %s)",
                    self._where,
                    self.breaker.pause_s,
                    self.breaker.failures_in_a_row,
                    exc.message,
                )
            raise
        except BaseException:  # cancelled: no verdict on the upstream
            self.breaker.release()
            raise
        self.breaker.success()
        return outputs

    async def _send(self, x: Array, spec: TensorSpec) -> dict[str, Array]:
        where = self._where
        try:
            status, payload = await self._exchange(encode_infer_request(x, spec))
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"{where} did not answer within {self._timeout_s * 1000:.0f} ms"
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{where} failed: {exc}") from None
        if status != 200:
            error = UpstreamError(
                f"{where} answered HTTP {status}: {payload[:300].decode(errors='replace')}"
            )
            if 400 <= status < 500:
                raise _Refused(error)
            raise error
        outputs = decode_infer_response(payload, where)
        for name, arr in outputs.items():
            if arr.shape[:1] != x.shape[:1]:
                raise UpstreamError(
                    f"{where} answered {arr.shape[0]} rows of {name!r} for {x.shape[0]} rows"
                )
        return outputs

    async def _exchange(self, body: bytes) -> tuple[int, bytes]:
        """One POST, and one more if the connection could not be made (nothing was sent, so
        sending again is safe) while the retry budget allows."""
        self.budget.called()
        try:
            return await self._post(body)
        except aiohttp.ClientConnectorError:
            if not self.budget.try_retry():
                raise
        return await self._post(body)

    async def _post(self, body: bytes) -> tuple[int, bytes]:
        async with self._pool.post(
            self.url + "/infer", data=body, timeout=self._timeout, headers=_JSON_HEADERS
        ) as resp:
            return resp.status, await resp.read()

    def metadata(self) -> dict[str, Any]:
        if self._schema is None:
            raise self._refusal()
        return {
            "platform": self._schema.platform,
            "url": self.url,
            "inputs": [self._schema.input.to_json()],
            "outputs": [o.to_json() for o in self._schema.outputs],
        }

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None
        await self._pool.close()


class _Refused(Exception):
    """The upstream answered the call with a 4xx: it is healthy, the call failed."""

    def __init__(self, error: UpstreamError) -> None:
        super().__init__(error.message)
        self.error = error


def _parse_schema(url: str, meta: dict[str, Any]) -> _Schema:
    """What the metadata says the model takes and answers; ModelLoadError if it is not Open
    Inference Protocol, or not a model mlproxy can forward to."""
    try:
        inputs = parse_tensor_specs(meta.get("inputs"), "inputs")
        outputs = parse_tensor_specs(meta.get("outputs"), "outputs")
    except ValueError as exc:
        raise ModelLoadError(f"{url}: metadata is not Open Inference Protocol: {exc}") from None
    if len(inputs) != 1 or len(inputs[0].shape) != 2:
        raise ModelLoadError(f"{url}: mlproxy forwards to models with one input of shape [-1, n]")
    return _Schema(inputs[0], outputs, str(meta.get("platform", "remote")))


def _read_baseline(path: Path, features: int) -> tuple[Manifest, str]:
    """A remote version's baseline manifest (as `mlproxy package` writes it) and its sha256."""
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the baseline manifest: {exc.strerror}") from None
    try:
        raw = orjson.loads(blob)
    except orjson.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: the baseline manifest is not JSON: {exc}") from None
    return parse_baseline_manifest(raw, str(path), features), hashlib.sha256(blob).hexdigest()
