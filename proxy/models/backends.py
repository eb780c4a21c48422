"""One interface to a model version: a local ONNX model behind a batcher, or a remote V2 server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Protocol

import aiohttp
import numpy as np

from proxy.config.schema import BatchingConfig, LimitsConfig, VersionConfig
from proxy.engine.batching import Batcher, BatcherState, Observer, batcher_settings
from proxy.engine.runner import Runners
from proxy.models.manifest import Manifest
from proxy.models.remote import RemoteModel, UpstreamHealth
from proxy.models.repository import OnnxModel
from proxy.protocol.codec import TensorSpec

Array = np.ndarray[Any, Any]
log = logging.getLogger("mlproxy.backends")


class BackendKind(StrEnum):
    ONNX = "onnx"  # a local ONNX file run by onnxruntime
    REMOTE = "remote"  # another Open Inference Protocol server


class Backend(Protocol):
    """What routing and the app need of a model version, wherever it runs."""

    version: str
    kind: BackendKind
    identity: str  # changes when what is served changes (sha256 for files, url for remotes)
    manifest: Manifest | None  # what the version is watched against (None: not watched)

    @property
    def input(self) -> TensorSpec:
        """The input requests are parsed as (UpstreamUnavailableError when none is known)."""

    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def available(self) -> bool:
        """False while calls are refused at once: a remote version not answering (yet), or
        ejected by its breaker. A local version always is."""

    def known_input(self) -> TensorSpec | None:
        """The input the version itself declares; None while a remote's metadata is unknown."""

    def expect(self, reference: Callable[[], TensorSpec | None]) -> None:
        """The model's input as the plan knows it, which a remote answering later must fit."""

    def health(self) -> UpstreamHealth | None:
        """A remote version's availability, breaker and retries; None for a local version."""

    def start(self) -> None:
        """Start background work (a remote's probes); called on every plan that serves it."""

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
    available = True

    def __init__(self, version: str, model: OnnxModel, batcher: Batcher, runners: Runners) -> None:
        self.version = version
        self.model = model
        self.batcher = batcher
        self._runners = runners
        self.input = model.input
        self.outputs = model.outputs
        self.identity = model.manifest.sha256
        self.manifest: Manifest | None = model.manifest

    def known_input(self) -> TensorSpec:
        return self.input

    def expect(self, reference: Callable[[], TensorSpec | None]) -> None:
        return None  # checked at load, against the manifest

    def health(self) -> None:
        return None

    def start(self) -> None:
        return None

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


class RemoteBackend(RemoteModel):
    """A version served by another Open Inference Protocol server (see RemoteModel: probed
    while unavailable, breaker, pool, retry budget)."""

    kind = BackendKind.REMOTE
    observer: Observer | None = None

    def set_observer(self, observer: Observer | None) -> None:
        self.observer = observer

    def batcher_state(self) -> None:
        return None

    def configure(self, batching: BatchingConfig, limits: LimitsConfig) -> None:
        return None  # the remote server batches (or not) on its own

    async def infer(self, x: Array, *, background: bool = False) -> dict[str, Array]:
        outputs = await self.call(x)
        if self.observer is not None and not background:
            try:
                self.observer(x, outputs)
            except Exception:  # monitoring must never fail a request
                log.exception("monitoring version %s at %s failed", self.version, self.url)
        return outputs


async def create_backend(
    config: VersionConfig,
    *,
    runners: Runners,
    http: aiohttp.ClientSession,
    batching: BatchingConfig,
    limits: LimitsConfig,
    model_name: str,
    clock: Callable[[], float],
) -> Backend:
    """Load (and warm) one version; ModelLoadError says which file or server is wrong and why
    (a remote server that does not answer is no error: the version is loaded unavailable)."""
    if config.url is not None:
        return await RemoteBackend.create(config, http, clock)
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
