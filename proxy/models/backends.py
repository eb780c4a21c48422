"""One interface to a model version: a local ONNX model behind a batcher, or a remote V2 server."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import numpy as np
import orjson

from proxy.config.schema import BatchingConfig, LimitsConfig, VersionConfig
from proxy.engine.batching import Batcher, BatcherState, Observer, batcher_settings
from proxy.engine.runner import Runners
from proxy.errors import ModelLoadError, UpstreamError, UpstreamTimeoutError
from proxy.models.manifest import Manifest, parse_baseline_manifest
from proxy.models.repository import OnnxModel
from proxy.protocol.codec import (
    TensorSpec,
    decode_infer_response,
    encode_infer_request,
    parse_tensor_specs,
)

Array = np.ndarray[Any, Any]
log = logging.getLogger("mlproxy.backends")


class BackendKind(StrEnum):
    ONNX = "onnx"  # a local ONNX file run by onnxruntime
    REMOTE = "remote"  # another Open Inference Protocol server


class Backend(Protocol):
    """What routing and the app need of a model version, wherever it runs."""

    version: str
    kind: BackendKind
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    identity: str  # changes when what is served changes (sha256 for files, url for remotes)
    manifest: Manifest | None  # what the version is watched against (None: not watched)

    def set_observer(self, observer: Observer | None) -> None:
        """Who sees every serving answer's rows and outputs (drift monitoring)."""

    async def infer(self, x: Array, *, background: bool = False) -> dict[str, Array]: ...

    def batcher_state(self) -> BatcherState | None:
        """The micro-batcher's counters and queue; None where the version has no batcher."""

    def configure(self, batching: BatchingConfig, limits: LimitsConfig) -> None:
        """Take a reloaded config's batching settings (a version kept warm across the reload)."""

    def metadata(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class LocalBackend:
    """An ONNX model version on disk, run by onnxruntime through a micro-batcher."""

    kind = BackendKind.ONNX

    def __init__(self, version: str, model: OnnxModel, batcher: Batcher, runners: Runners) -> None:
        self.version = version
        self.model = model
        self.batcher = batcher
        self._runners = runners
        self.input = model.input
        self.outputs = model.outputs
        self.identity = model.manifest.sha256
        self.manifest: Manifest | None = model.manifest

    def set_observer(self, observer: Observer | None) -> None:
        self.batcher.observer = observer

    def batcher_state(self) -> BatcherState:
        return self.batcher.state()

    def configure(self, batching: BatchingConfig, limits: LimitsConfig) -> None:
        self.batcher.configure(batching, limits)

    async def infer(self, x: Array, *, background: bool = False) -> dict[str, Array]:
        """Serving requests go through the batcher; background work (already batched by its
        caller) runs on the low-priority thread so it never delays a serving run."""
        if background:
            return await self._runners.background.submit(self.model.run, x)
        return await self.batcher.submit(x)

    def metadata(self) -> dict[str, Any]:
        m = self.model.manifest
        return {
            "platform": "onnxruntime_onnx",
            "inputs": [{**self.input.to_json(), "features": list(m.features)}],
            "outputs": [o.to_json() for o in self.outputs],
            "task": str(m.task),
            "sha256": m.sha256,
            "training_data": m.training_data,
            "metrics": m.metrics or None,
        }

    async def close(self) -> None:
        await self.batcher.close()


class RemoteBackend:
    """A version served by another Open Inference Protocol server at `url` (.../v2/models/<name>)."""

    kind = BackendKind.REMOTE

    def __init__(
        self, config: VersionConfig, http: aiohttp.ClientSession, meta: dict[str, Any]
    ) -> None:
        assert config.url is not None
        self.version = config.name
        self.url = config.url
        self.identity = config.url
        self.manifest: Manifest | None = None
        self.observer: Observer | None = None
        self._http = http
        self._timeout_s = config.timeout_ms / 1000.0
        self._timeout = aiohttp.ClientTimeout(total=self._timeout_s)
        self._meta = meta
        try:
            inputs = parse_tensor_specs(meta.get("inputs"), "inputs")
            self.outputs = parse_tensor_specs(meta.get("outputs"), "outputs")
        except ValueError as exc:
            raise ModelLoadError(
                f"{self.url}: metadata is not Open Inference Protocol: {exc}"
            ) from None
        if len(inputs) != 1 or len(inputs[0].shape) != 2:
            raise ModelLoadError(
                f"{self.url}: mlproxy forwards to models with one input of shape [-1, n]"
            )
        self.input = inputs[0]

    @classmethod
    async def create(cls, config: VersionConfig, http: aiohttp.ClientSession) -> RemoteBackend:
        """Ask the server for the model's metadata; a server that does not answer is refused."""
        assert config.url is not None
        try:
            async with http.get(
                config.url,
                timeout=aiohttp.ClientTimeout(total=max(config.timeout_ms / 1000.0, 2.0)),
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise ModelLoadError(
                        f"{config.url}: metadata call answered HTTP {resp.status}: {body[:200]!r}"
                    )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ModelLoadError(f"{config.url}: metadata call failed: {exc!r}") from None
        try:
            meta = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ModelLoadError(f"{config.url}: metadata is not JSON") from None
        if not isinstance(meta, dict):
            raise ModelLoadError(f"{config.url}: metadata is not a JSON object")
        backend = cls(config, http, meta)
        if config.baseline is not None:
            path = config.baseline
            manifest, digest = await asyncio.get_running_loop().run_in_executor(
                None, _read_baseline, path, backend.input.shape[1]
            )
            backend.manifest = manifest
            backend.identity = f"{config.url}#{digest}"
        return backend

    def set_observer(self, observer: Observer | None) -> None:
        self.observer = observer

    def batcher_state(self) -> None:
        return None

    def configure(self, batching: BatchingConfig, limits: LimitsConfig) -> None:
        return None  # the remote server batches (or not) on its own

    async def infer(self, x: Array, *, background: bool = False) -> dict[str, Array]:
        body = encode_infer_request(x, self.input)
        where = f"version {self.version} at {self.url}"
        try:
            async with self._http.post(
                self.url + "/infer",
                data=body,
                timeout=self._timeout,
                headers={"Content-Type": "application/json"},
            ) as resp:
                payload = await resp.read()
                if resp.status != 200:
                    raise UpstreamError(
                        f"{where} answered HTTP {resp.status}: {payload[:300].decode(errors='replace')}"
                    )
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"{where} did not answer within {self._timeout_s * 1000:.0f} ms"
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{where} failed: {exc}") from None
        outputs = decode_infer_response(payload, where)
        for name, arr in outputs.items():
            if arr.shape[:1] != x.shape[:1]:
                raise UpstreamError(
                    f"{where} answered {arr.shape[0]} rows of {name!r} for {x.shape[0]} rows"
                )
        if self.observer is not None and not background:
            try:
                self.observer(x, outputs)
            except Exception:  # monitoring must never fail a request
                log.exception("monitoring %s failed", where)
        return outputs

    def metadata(self) -> dict[str, Any]:
        return {
            "platform": self._meta.get("platform", "remote"),
            "url": self.url,
            "inputs": [self.input.to_json()],
            "outputs": [o.to_json() for o in self.outputs],
        }

    async def close(self) -> None:
        return None


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


async def create_backend(
    config: VersionConfig,
    *,
    runners: Runners,
    http: aiohttp.ClientSession,
    batching: BatchingConfig,
    limits: LimitsConfig,
    model_name: str,
) -> Backend:
    """Load (and warm) one version; ModelLoadError says which file or server is wrong and why."""
    if config.url is not None:
        return await RemoteBackend.create(config, http)
    assert config.path is not None
    loop = asyncio.get_running_loop()
    # Loading parses and warms the model: seconds for big ones, so keep it off the event loop.
    path = config.path
    model = await loop.run_in_executor(None, lambda: OnnxModel(path))
    batcher = Batcher(
        model.run,
        runner=runners.serving,
        name=f"{model_name}/{config.name}",
        **batcher_settings(batching, limits),
    )
    return LocalBackend(config.name, model, batcher, runners)
