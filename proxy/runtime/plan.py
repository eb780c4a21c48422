"""The Plan: everything one config serves (backends, strategies, mirror lanes), built before use."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from proxy.config.schema import Config, ModelConfig, ShadowConfig, VersionConfig, VersionKey
from proxy.engine.counters import Counters
from proxy.engine.mirror import MIRROR_BATCH_ROWS, MirrorLane
from proxy.engine.runner import Runners
from proxy.engine.stats import VersionStats
from proxy.engine.throttle import LogThrottle
from proxy.errors import ConfigError, ModelLoadError
from proxy.models.backends import Backend, create_backend
from proxy.models.repository import MODEL_FILE, sha256_file
from proxy.protocol.codec import TensorSpec
from proxy.routing.strategy import Strategy, create_strategy

# A failing version's fallbacks are logged at most once per this many seconds (with the count).
FALLBACK_LOG_INTERVAL_S = 10.0


@dataclass(slots=True)
class ModelPlan:
    """One model as served: its config, routing strategy, loaded versions and mirror lanes."""

    config: ModelConfig
    strategy: Strategy
    backends: dict[str, Backend]
    stats: dict[str, VersionStats]
    fallback_log: LogThrottle  # kept across reloads: one message per interval per version
    lanes: dict[str, MirrorLane] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    def ready(self) -> bool:
        """Can every request routed to the model be answered? A version with a share of the
        traffic that is not available is covered by stable (its fallback), unless it is stable
        itself: only a model whose sole server is unavailable is not ready."""
        stable = self.config.stable
        stable_ok = stable in self.backends and self.backends[stable].available
        for v, share in self.strategy.split().items():
            if share > 0 and not self.backends[v].available and (v == stable or not stable_ok):
                return False
        return True

    def reference_input(self) -> TensorSpec | None:
        return _reference_input(self.config, self.backends)


@dataclass(slots=True)
class Plan:
    """What one config serves. A reload builds a new Plan beside this one and swaps the
    reference; requests hold the Plan they started on (`enter`/`leave`), and a retired Plan's
    own backends are closed once its last request has left."""

    config: Config
    models: dict[str, ModelPlan]
    loaded_at: float
    active: int = 0
    retired: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self) -> None:
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0 and self.retired:
            self.idle.set()

    def retire(self) -> None:
        self.retired = True
        if self.active == 0:
            self.idle.set()

    def backends(self) -> set[Backend]:
        return {b for mp in self.models.values() for b in mp.backends.values()}


async def _reusable(
    vc: VersionConfig, old: Backend | None, old_vc: VersionConfig | None
) -> Backend | None:
    """The running backend for this version if nothing about it changed (sha256 on disk included)."""
    if old is None or old_vc is None or vc != old_vc:
        return None
    path = vc.path / MODEL_FILE if vc.path is not None else vc.baseline
    if path is not None:
        try:
            digest = await asyncio.get_running_loop().run_in_executor(None, sha256_file, path)
        except OSError:
            return None  # gone or unreadable: a fresh load reports the problem
        if not old.identity.endswith(digest):
            return None
    return old


async def create_plan(
    config: Config,
    *,
    runners: Runners,
    http: aiohttp.ClientSession,
    counters: Counters,
    previous: Plan | None = None,
    clock: Callable[[], float] | None = None,
) -> tuple[Plan, int]:
    """Load and warm every new or changed version; reuse the warm ones of `previous`.

    Returns the plan and how many versions were loaded (not reused). ConfigError lists each
    version that failed; then nothing new is left open.
    """
    clock = clock or asyncio.get_running_loop().time
    loaded, fresh, errors = await _load_versions(config, runners, http, previous, clock)
    if not errors:  # (a remote version not answering yet is checked when it does)
        for model in config.models.values():
            errors.extend(_check_inputs(model, loaded[model.name]))
            errors.extend(_check_drift_gate(model, loaded[model.name]))
    if errors:
        await asyncio.gather(*(b.close() for b in fresh))
        raise ConfigError(errors, config.source)
    for group in loaded.values():  # a reused batcher takes the new batching settings
        for b in group.values():
            b.configure(config.batching, config.limits)
    models = {
        m.name: _model_plan(
            m,
            loaded[m.name],
            config=config,
            counters=counters,
            clock=clock,
            previous=previous.models.get(m.name) if previous else None,
        )
        for m in config.models.values()
    }
    return Plan(config=config, models=models, loaded_at=time.time()), len(fresh)


async def _load_versions(
    config: Config,
    runners: Runners,
    http: aiohttp.ClientSession,
    previous: Plan | None,
    clock: Callable[[], float],
) -> tuple[dict[str, dict[str, Backend]], list[Backend], list[str]]:
    """Load every version of `config` at once, reusing `previous`'s warm ones: (the backends by
    model and version, those newly opened, one error line per version that failed)."""
    jobs = []
    keys = []
    for model in config.models.values():
        old_mp = previous.models.get(model.name) if previous else None
        for vc in model.versions.values():
            old = old_mp.backends.get(vc.name) if old_mp else None
            old_vc = old_mp.config.versions.get(vc.name) if old_mp else None
            keys.append((model, vc.name))
            jobs.append(_load_or_reuse(vc, old, old_vc, runners, http, config, model.name, clock))
    results = await asyncio.gather(*jobs, return_exceptions=True)
    errors: list[str] = []
    loaded: dict[str, dict[str, Backend]] = {m: {} for m in config.models}
    fresh: list[Backend] = []
    reused = previous.backends() if previous else set()
    for (model, vname), res in zip(keys, results, strict=True):
        if isinstance(res, ModelLoadError):
            errors.append(f"models.{model.name}.versions.{vname}: {res}")
        elif isinstance(res, BaseException):
            errors.append(f"models.{model.name}.versions.{vname}: cannot load: {res!r}")
        else:
            loaded[model.name][vname] = res
            if res not in reused:
                fresh.append(res)
    return loaded, fresh, errors


def _model_plan(
    model: ModelConfig,
    backends: dict[str, Backend],
    *,
    config: Config,
    counters: Counters,
    clock: Callable[[], float],
    previous: ModelPlan | None,
) -> ModelPlan:
    mp = ModelPlan(
        config=model,
        strategy=create_strategy(model),
        backends=backends,
        stats={v: counters.version(VersionKey(model.name, v)) for v in backends},
        fallback_log=(
            previous.fallback_log if previous else LogThrottle(FALLBACK_LOG_INTERVAL_S, clock)
        ),
    )
    for b in backends.values():  # a remote answering later must take what the others take
        b.expect(mp.reference_input)
    # A gated canary's agreement mirror has no [shadow] table: it takes the table's defaults.
    s = model.shadow or ShadowConfig(primary=model.stable, mirrors=())
    for m in _mirror_targets(model):
        mp.lanes[m] = MirrorLane(
            backends[m],
            mp.stats[m].mirror,
            queue_rows=s.queue_rows,
            max_batch_rows=max(MIRROR_BATCH_ROWS, config.batching.max_batch_size),
            timeout_s=s.timeout_ms / 1000.0,
            breaker_failures=s.breaker_failures,
            breaker_pause_s=s.breaker_pause_s,
            clock=clock,
            opened=not backends[m].available,  # tried after one pause, while it is probed
        )
    return mp


def _mirror_targets(model: ModelConfig) -> tuple[str, ...]:
    if model.mode == "shadow" and model.shadow is not None:
        return model.shadow.mirrors
    c = model.canary
    if (
        model.mode == "canary"
        and c is not None
        and c.canary is not None
        and c.gates.min_agreement is not None
    ):
        return (model.stable,)  # canary answers are compared with stable's
    return ()


async def _load_or_reuse(
    vc: VersionConfig,
    old: Backend | None,
    old_vc: VersionConfig | None,
    runners: Runners,
    http: aiohttp.ClientSession,
    config: Config,
    model_name: str,
    clock: Callable[[], float],
) -> Backend:
    same = await _reusable(vc, old, old_vc)
    if same is not None:
        return same
    return await create_backend(
        vc,
        runners=runners,
        http=http,
        batching=config.batching,
        limits=config.limits,
        model_name=model_name,
        clock=clock,
    )


def _check_drift_gate(model: ModelConfig, backends: dict[str, Backend]) -> list[str]:
    """A max_psi gate needs the canary's drift: a local version with a baseline, monitoring on."""
    c = model.canary
    if model.mode != "canary" or c is None or c.canary is None or c.gates.max_psi is None:
        return []
    key = f"models.{model.name}.canary.gates.max_psi"
    if not model.drift.enabled:
        return [f"{key}: needs drift monitoring, but models.{model.name}.drift.enabled = false"]
    manifest = backends[c.canary].manifest
    if manifest is None or manifest.baseline is None:
        return [
            f"{key}: {c.canary} has no baseline statistics to judge drift against"
            " (a remote version without a baseline manifest, or a manifest without baseline statistics)"
        ]
    return []


def _reference(model: ModelConfig, backends: dict[str, Backend]) -> tuple[str, TensorSpec] | None:
    """The version whose input all must take: stable, or (stable a remote not answering yet) the
    first other version whose input is known; None while no version's is."""
    for v in (model.stable, *backends):
        b = backends.get(v)
        spec = None if b is None else b.known_input()
        if spec is not None:
            return v, spec
    return None


def _reference_input(model: ModelConfig, backends: dict[str, Backend]) -> TensorSpec | None:
    ref = _reference(model, backends)
    return None if ref is None else ref[1]


def _check_inputs(model: ModelConfig, backends: dict[str, Backend]) -> list[str]:
    """All versions of a model must take the same input, or routing between them is unsafe."""
    ref = _reference(model, backends)
    if ref is None:
        return []
    whose, want = ref
    if whose == model.stable:
        whose = f"the stable version {whose}"
    errors = []
    for v, b in backends.items():
        spec = b.known_input()
        if spec is not None and (spec.shape[1] != want.shape[1] or spec.name != want.name):
            errors.append(
                f"models.{model.name}.versions.{v}: takes input {spec.to_json()},"
                f" but {whose} takes {want.to_json()};"
                " all versions of a model must take the same input"
            )
    return errors


def start_plan(plan: Plan) -> None:
    for mp in plan.models.values():
        for b in mp.backends.values():  # idempotent: a version kept across a reload goes on
            b.start()
        for lane in mp.lanes.values():
            lane.start()


async def close_plan(plan: Plan, keep: set[Backend] | None = None) -> None:
    """Stop the plan's mirror lanes and close its backends, except those in `keep`."""
    for mp in plan.models.values():
        for lane in mp.lanes.values():
            await lane.close()
    keep = keep or set()
    await asyncio.gather(*(b.close() for b in plan.backends() if b not in keep))
