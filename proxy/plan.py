"""The Plan: everything one config serves (backends, strategies, mirror lanes), built before use."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from .backends import Backend, create_backend
from .config import Config, ModelConfig
from .errors import ConfigError, ModelLoadError
from .monitor.stats import VersionStats
from .routing import Strategy, create_strategy
from .runner import Runners
from .shadow import MIRROR_BATCH_ROWS, MirrorLane


class StatsBook:
    """Per (model, version) statistics; outlives plans so a reload keeps the counts."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], VersionStats] = {}

    def get(self, model: str, version: str) -> VersionStats:
        key = (model, version)
        st = self._stats.get(key)
        if st is None:
            st = self._stats[key] = VersionStats()
        return st

    def items(self) -> list[tuple[tuple[str, str], VersionStats]]:
        return list(self._stats.items())


@dataclass(slots=True)
class ModelPlan:
    """One model as served: its config, routing strategy, loaded versions and mirror lanes."""

    config: ModelConfig
    strategy: Strategy
    backends: dict[str, Backend]
    stats: dict[str, VersionStats]
    lanes: dict[str, MirrorLane] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(slots=True)
class Plan:
    """An immutable serving plan; a reload builds a new one and swaps the reference."""

    config: Config
    models: dict[str, ModelPlan]
    loaded_at: float


async def create_plan(
    config: Config,
    *,
    runners: Runners,
    http: aiohttp.ClientSession,
    stats: StatsBook,
    clock: Callable[[], float] | None = None,
) -> Plan:
    """Load and warm every version of every model; ConfigError lists each version that failed."""
    loop = asyncio.get_running_loop()
    clock = clock or loop.time
    jobs = []
    keys = []
    for model in config.models.values():
        for vc in model.versions.values():
            keys.append((model, vc.name))
            jobs.append(
                create_backend(
                    vc,
                    runners=runners,
                    http=http,
                    batching=config.batching,
                    limits=config.limits,
                    model_name=model.name,
                )
            )
    results = await asyncio.gather(*jobs, return_exceptions=True)
    errors: list[str] = []
    loaded: dict[str, dict[str, Backend]] = {m: {} for m in config.models}
    for (model, vname), res in zip(keys, results, strict=True):
        if isinstance(res, ModelLoadError):
            errors.append(f"models.{model.name}.versions.{vname}: {res}")
        elif isinstance(res, BaseException):
            errors.append(f"models.{model.name}.versions.{vname}: cannot load: {res!r}")
        else:
            loaded[model.name][vname] = res
    if not errors:
        for model in config.models.values():
            errors.extend(_check_inputs(model, loaded[model.name]))
    if errors:
        await asyncio.gather(*(b.close() for group in loaded.values() for b in group.values()))
        raise ConfigError(errors, config.source)
    models = {}
    for model in config.models.values():
        backends = loaded[model.name]
        mp = ModelPlan(
            config=model,
            strategy=create_strategy(model),
            backends=backends,
            stats={v: stats.get(model.name, v) for v in backends},
        )
        if model.mode == "shadow" and model.shadow is not None:
            s = model.shadow
            for m in s.mirrors:
                mp.lanes[m] = MirrorLane(
                    backends[m],
                    mp.stats[m].mirror,
                    queue_rows=s.queue_rows,
                    max_batch_rows=max(MIRROR_BATCH_ROWS, config.batching.max_batch_size),
                    timeout_s=s.timeout_ms / 1000.0,
                    breaker_failures=s.breaker_failures,
                    breaker_pause_s=s.breaker_pause_s,
                    clock=clock,
                )
        models[model.name] = mp
    return Plan(config=config, models=models, loaded_at=time.time())


def _check_inputs(model: ModelConfig, backends: dict[str, Backend]) -> list[str]:
    """All versions of a model must take the same input, or routing between them is unsafe."""
    ref = backends[model.stable].input
    errors = []
    for v, b in backends.items():
        if b.input.shape[1] != ref.shape[1] or b.input.name != ref.name:
            errors.append(
                f"models.{model.name}.versions.{v}: takes input {b.input.to_json()},"
                f" but the stable version {model.stable} takes {ref.to_json()};"
                " all versions of a model must take the same input"
            )
    return errors


def start_plan(plan: Plan) -> None:
    for mp in plan.models.values():
        for lane in mp.lanes.values():
            lane.start()


async def close_plan(plan: Plan) -> None:
    """Stop mirror lanes and close every backend (after the plan's requests are done)."""
    for mp in plan.models.values():
        for lane in mp.lanes.values():
            await lane.close()
    await asyncio.gather(*(b.close() for mp in plan.models.values() for b in mp.backends.values()))
