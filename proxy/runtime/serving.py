"""Serving: the parts the two HTTP planes share, built and closed together.

Each part has one reason to change: `current` (the plan in force, requests in flight),
`counters` (every count, behind methods), `reloader`, `rollouts`, `scheduler` (the timer),
`load` (the loop's lag and CPU share), `watch` (monitors and feedback), `ids` (the ids of
requests that came without one), `alerts`, `webhooks`, `state` and `audit`. This class only
holds them."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from proxy.config.schema import Config
from proxy.engine.admission import AdaptiveLimit, Admission
from proxy.engine.counters import Counters
from proxy.engine.pool import CountsPool
from proxy.engine.runner import Runners
from proxy.monitoring.alerts import Alerts
from proxy.monitoring.tracker import Role
from proxy.monitoring.watch import Watch
from proxy.protocol.ids import RequestIds
from proxy.runtime.current import Current
from proxy.runtime.group import Group
from proxy.runtime.load import LoopLoad
from proxy.runtime.plan import Plan, close_plan, create_plan, start_plan
from proxy.runtime.pooled import prediction_stores, request_ids
from proxy.runtime.reloader import Reloader
from proxy.runtime.rollouts import Rollouts
from proxy.runtime.scheduler import Scheduler
from proxy.runtime.state import AuditLog, StateFile, Writer
from proxy.runtime.tasks import Tasks
from proxy.runtime.webhooks import Webhooks


@dataclass(frozen=True, slots=True)
class Serving:
    """What the data and admin planes share: the plan in force and what outlives plans."""

    current: Current
    counters: Counters
    reloader: Reloader
    rollouts: Rollouts
    scheduler: Scheduler
    load: LoopLoad
    watch: Watch
    alerts: Alerts
    webhooks: Webhooks
    state: StateFile
    audit: AuditLog
    rng: random.Random
    tasks: Tasks
    runners: Runners
    http: aiohttp.ClientSession
    writer: Writer
    ids: RequestIds  # makes the ids of requests without one; the watch's stores check them
    admission: Admission[Any]  # slots and the waiting queue; the data plane's connections use it
    group: Group  # who serves (status `workers`)

    @property
    def plan(self) -> Plan:
        return self.current.plan

    @property
    def config(self) -> Config:
        return self.current.plan.config

    async def close(self) -> None:
        await self.tasks.cancel()
        await self.webhooks.close()
        await close_plan(self.current.plan)
        await self.http.close()
        self.runners.close()
        self.writer.close()


def state_paths(config: Config) -> tuple[Path, Path]:
    """The state file and audit log live beside the config: config.toml -> config.state.json."""
    source = Path(config.source)
    return source.with_name(source.stem + ".state.json"), source.with_name(
        source.stem + ".audit.jsonl"
    )


async def create_serving(
    config: Config,
    *,
    rng: random.Random | None = None,
    onnx_threads: int = 2,
    worker: CountsPool | None = None,
    pooled: bool = False,
) -> Serving:
    """Build the run threads, the shared HTTP client and the first plan; the caller closes it.

    `worker`: this is worker `worker.slot` of a supervisor, which alone decides and records
    rollouts and posts alerts: the state file is read, never written; audit entries say which
    worker wrote them; no webhook is posted from here, and its monitors only count (the
    supervisor judges); its request ids and predictions are the group's (any worker joins
    feedback for any worker's answer). `pooled`: this is that supervisor, whose monitors judge
    the workers' pooled counts."""
    runners = Runners.create(onnx_threads)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    counters = Counters()
    try:
        plan, _ = await create_plan(config, runners=runners, http=http, counters=counters)
    except BaseException:
        await http.close()
        runners.close()
        raise
    serving = _wire(
        plan, runners=runners, http=http, counters=counters, rng=rng, worker=worker, pooled=pooled
    )
    if serving.state.load_error:
        serving.reloader.last_error = serving.state.load_error
    start_plan(plan)
    serving.audit.append(
        "start", digest=config.digest, models={m: mp.config.mode for m, mp in plan.models.items()}
    )
    return serving


def _wire(
    plan: Plan,
    *,
    runners: Runners,
    http: aiohttp.ClientSession,
    counters: Counters,
    rng: random.Random | None,
    worker: CountsPool | None,
    pooled: bool,
) -> Serving:
    """Make the parts and hand each the others it uses."""
    clock = asyncio.get_running_loop().time
    writer = Writer()
    state_path, audit_path = state_paths(plan.config)
    state = StateFile(state_path, writer, read_only=worker is not None)
    audit = AuditLog(audit_path, writer, fields=None if worker is None else {"worker": worker.slot})
    alerts, tasks, current, load = Alerts(), Tasks(), Current(plan), LoopLoad()
    ids = RequestIds() if worker is None else request_ids(worker)
    limits = plan.config.limits
    admission: Admission[Any] = Admission(
        limit=AdaptiveLimit(ceiling=limits.max_inflight, adaptive=limits.adaptive),
        deadline_s=limits.queue_timeout_ms / 1000.0,
    )
    role: Role = "worker" if worker is not None else "pooled" if pooled else "local"
    stores = None if worker is None else prediction_stores(worker, ids)
    watch = Watch(alerts, counters, ids=ids, role=role, stores=stores)
    webhooks = Webhooks(alerts, http, tasks)
    rollouts = Rollouts(
        plan=lambda: current.plan, watch=watch, state=state, audit=audit, alerts=alerts, clock=clock
    )

    def on_swap(new: Plan) -> None:
        rollouts.attach(new)
        watch.attach(new)
        if worker is None:
            webhooks.attach(new.config.alerts.webhook)

    reloader = Reloader(
        current, runners=runners, http=http, counters=counters, audit=audit, tasks=tasks,
        on_swap=on_swap,
    )  # fmt: skip
    scheduler = Scheduler(
        current=current, reloader=reloader, watch=watch, rollouts=rollouts, load=load, clock=clock
    )
    on_swap(plan)
    return Serving(
        current=current, counters=counters, reloader=reloader, rollouts=rollouts,
        scheduler=scheduler, load=load, watch=watch, alerts=alerts, webhooks=webhooks,
        state=state, audit=audit, rng=rng or random.Random(), tasks=tasks, runners=runners,
        http=http, writer=writer, ids=ids, admission=admission,
        group=Group(
            lambda: current.plan.config.digest,
            counters.requests_total,
        ),
    )  # fmt: skip


async def close_serving(serving: Serving) -> None:
    await serving.close()
