"""Serving: the plan in force and everything that changes it (reloads, rollouts), with their records."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
from pathlib import Path
from time import perf_counter, thread_time
from typing import Any

import aiohttp

from proxy.config.load import load_config
from proxy.config.schema import Config
from proxy.engine.mirror import BUSY_KEEP_EVERY
from proxy.engine.runner import Runners
from proxy.errors import ConfigError
from proxy.monitoring.alerts import Alerts
from proxy.monitoring.watch import Watch
from proxy.monitoring.webhook import WebhookSender
from proxy.routing.rollout import RolloutController, rollout_key
from proxy.routing.strategy import create_strategy
from proxy.runtime.plan import Plan, StatsBook, close_plan, create_plan, start_plan
from proxy.runtime.state import AuditLog, StateFile

log = logging.getLogger("mlproxy")
WATCH_INTERVAL_S = 0.25
# Mirrors yield (see MirrorLane.busy) once the loop thread used this share of a CPU over one
# WATCH_INTERVAL_S, and mirror fully again once it is back under BUSY_LEAVE.
BUSY_ENTER = 0.85
BUSY_LEAVE = 0.7
TICK_INTERVAL_S = 0.5
RESTART_ONLY = ("server", "admin")  # sections a reload cannot change on a listening process


class ConfigWatcher:
    """Notices a changed config file: a write in place, an editor's write-and-rename, and a
    Kubernetes ConfigMap's `..data` symlink swap (the resolved path changes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last = self.signature()

    def signature(self) -> tuple[Any, ...] | None:
        try:
            st = os.stat(self.path)  # follows symlinks, so a swapped ..data link shows
        except OSError:
            return None  # mid-swap, or deleted: wait for it to come back
        return (os.path.realpath(self.path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def check(self) -> bool:
        """True once per change (the step function: the serving loop calls it on a timer)."""
        sig = self.signature()
        if sig is None or sig == self._last:
            return False
        self._last = sig
        return True


class Serving:
    """What the data and admin planes share: the plan in force and what outlives plans."""

    def __init__(
        self,
        plan: Plan,
        *,
        stats: StatsBook,
        runners: Runners,
        http: aiohttp.ClientSession,
        rng: random.Random,
        state: StateFile,
        audit: AuditLog,
        alerts: Alerts,
    ) -> None:
        self.plan = plan
        self.stats = stats
        self.runners = runners
        self.http = http
        self.rng = rng
        self.state = state
        self.audit = audit
        self.alerts = alerts
        self.inflight = 0
        self.shed = 0
        self.fallbacks: dict[tuple[str, str], int] = {}
        self.reloads = {"ok": 0, "error": 0}
        self.mirrors_yield = False  # the serving loop is busy: mirrors yield (MirrorLane.busy)
        self.last_error: str | None = None
        self.controllers: dict[str, RolloutController] = {}
        self.config_path = Path(plan.config.source)
        self.watcher: ConfigWatcher | None = None
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop = asyncio.get_running_loop()
        self.watch = Watch(alerts)
        self.webhook: WebhookSender | None = None
        self._attach_controllers()
        self._attach_watch()

    @property
    def config(self) -> Config:
        return self.plan.config

    def loop_time(self) -> float:
        return self._loop.time()

    # ---------------------------------------------------------------- requests in flight

    def request_started(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def drained(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # ---------------------------------------------------------------- rollouts

    def _attach_controllers(self, previous: dict[str, RolloutController] | None = None) -> None:
        controllers = {}
        now = self._loop.time()
        for name, mp in self.plan.models.items():
            c = mp.config.canary
            if mp.config.mode != "canary" or c is None or c.canary is None:
                continue
            old = (previous or {}).get(name)
            if old is not None and old.key == rollout_key(mp.config):
                controllers[name] = old  # same rollout: keep its step clock and counters
                old.model = mp.config
                old.digest = self.plan.config.digest
                self._apply_weights(name, old.weights())
                continue
            controllers[name] = RolloutController(
                mp.config,
                canary_stats=mp.stats[c.canary],
                stable_stats=mp.stats[mp.config.stable],
                state=self.state,
                audit=self.audit,
                alerts=self.alerts,
                apply=functools.partial(self._apply_weights, name),
                now=now,
                drift=functools.partial(self._worst_drift, name, c.canary),
            )
        for controller in controllers.values():
            controller.digest = self.plan.config.digest
        self.controllers = controllers

    def _worst_drift(self, model: str, version: str) -> tuple[str, float] | None:
        """The version's most drifted distribution over its short window, once that is full."""
        vw = self.watch.versions.get((model, version))
        if vw is None or vw.monitor is None:
            return None
        self.watch.flush()  # routes any level change to its alert, as every reader does
        judged = vw.monitor.judged.get("short")
        if judged is None:
            return None
        i = int(judged.psi.argmax())
        return vw.monitor.baseline.names[i], float(judged.psi[i])

    def _apply_weights(self, model: str, weights: dict[str, float]) -> None:
        mp = self.plan.models.get(model)
        if mp is not None:
            mp.strategy = create_strategy(mp.config, weights)

    def tick(self, now: float | None = None) -> None:
        """Step every rollout controller (the serving loop calls it on a timer)."""
        now = self._loop.time() if now is None else now
        for controller in list(self.controllers.values()):
            try:
                controller.tick(now)
            except Exception:
                log.exception("rollout controller of %s failed", controller.model.name)

    # ---------------------------------------------------------------- reload

    async def reload(self, cause: str, *, only_if_changed: bool = False) -> dict[str, Any]:
        """Validate the config file, load what is new or changed, warm it, then swap the plan.

        A config that fails anywhere changes nothing: the running plan keeps serving and the
        error is kept in `last_error` until a good reload clears it. Reloads are serialised.
        """
        async with self._lock:
            before = self.plan.config.digest
            try:
                config = load_config(self.config_path)
                if only_if_changed and config.digest == before:
                    return {"outcome": "unchanged", "digest": before}
                plan, loaded = await create_plan(
                    config,
                    runners=self.runners,
                    http=self.http,
                    stats=self.stats,
                    previous=self.plan,
                )
            except ConfigError as exc:
                self.reloads["error"] += 1
                self.last_error = str(exc)
                log.error("reload (%s) refused; still serving %s:\n%s", cause, before[:12], exc)
                self.audit.append("reload_refused", cause=cause, digest=before, errors=exc.errors)
                return {"outcome": "error", "errors": [f"{exc.source}:{e}" for e in exc.errors]}
            for section in RESTART_ONLY:
                if getattr(config, section) != getattr(self.plan.config, section):
                    log.warning("[%s] changed: it takes effect at the next restart", section)
            old = self.plan
            self.plan = plan
            self._attach_controllers(self.controllers)
            self._attach_watch()
            start_plan(plan)
            old.retire()
            self._spawn(self._close_when_idle(old, plan))
            self.reloads["ok"] += 1
            self.last_error = None
            self.audit.append(
                "reload",
                cause=cause,
                digest_before=before,
                digest_after=config.digest,
                versions_loaded=loaded,
            )
            log.info(
                "reloaded (%s): %s -> %s, %d version(s) loaded",
                cause,
                before[:12],
                config.digest[:12],
                loaded,
            )
            return {"outcome": "ok", "digest": config.digest, "versions_loaded": loaded}

    async def _close_when_idle(self, old: Plan, new: Plan) -> None:
        await old.idle.wait()  # its last request has left
        await close_plan(old, keep=new.backends() | self.plan.backends())

    async def _background_idle(self) -> None:
        """Wait for background jobs (closing retired plans) to finish; for tests and shutdown."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _attach_watch(self) -> None:
        self.watch.attach(self.plan)
        url = self.plan.config.alerts.webhook
        if self.webhook is not None and self.webhook.url != url:
            self.alerts.listeners.remove(self.webhook.submit)
            self._spawn(self.webhook.close())
            self.webhook = None
        if url and self.webhook is None:
            self.webhook = WebhookSender(url, self.http)
            self.alerts.listeners.append(self.webhook.submit)
            self.webhook.start()

    def loop_busy(self, share: float) -> None:
        """Take the serving loop's CPU share over the last interval (thread CPU time / wall
        time); mirrors yield while it is high (entered at BUSY_ENTER, left under BUSY_LEAVE)."""
        self.watch.loop_busy = share
        busy = share >= BUSY_ENTER or (self.mirrors_yield and share >= BUSY_LEAVE)
        if busy != self.mirrors_yield:
            self.mirrors_yield = busy
            log.info(
                "serving loop at %.0f%% of a CPU: mirrors %s",
                share * 100,
                f"take 1 request in {BUSY_KEEP_EVERY}" if busy else "take every request again",
            )
        for mp in self.plan.models.values():
            for lane in mp.lanes.values():
                lane.busy = busy

    def housekeeping(self, now: float | None = None) -> None:
        """Monitoring's periodic step (the serving loop calls it; tests call it directly)."""
        now = self._loop.time() if now is None else now
        self.watch.housekeeping(now, self.plan, self.stats)

    async def run_background(self, *, watch: bool = True) -> None:
        """Watch the config file, tick the rollouts, measure event-loop lag, keep monitors current."""
        self.watcher = ConfigWatcher(self.config_path) if watch else None
        next_tick = 0.0
        while True:
            before, cpu_before = perf_counter(), thread_time()
            await asyncio.sleep(WATCH_INTERVAL_S)  # a timer, not a synchronisation: these jobs poll
            elapsed = perf_counter() - before
            self.watch.loop_lag(elapsed - WATCH_INTERVAL_S)
            self.loop_busy((thread_time() - cpu_before) / elapsed)
            if self.watcher is not None and self.watcher.check():
                try:
                    await self.reload("file changed", only_if_changed=True)
                except Exception:  # never let one bad reload stop watching
                    log.exception("reload after a file change failed")
            now = self._loop.time()
            try:
                self.housekeeping(now)
            except Exception:
                log.exception("monitoring housekeeping failed")
            if now >= next_tick:
                self.tick(now)
                next_tick = now + TICK_INTERVAL_S

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.webhook is not None:
            try:
                await asyncio.wait_for(self.webhook.idle(), timeout=2.0)  # last alerts out, briefly
            except TimeoutError:
                pass
            await self.webhook.close()
        await close_plan(self.plan)
        await self.http.close()
        self.runners.close()


def state_paths(config: Config) -> tuple[Path, Path]:
    """The state file and audit log live beside the config: config.toml -> config.state.json."""
    source = Path(config.source)
    return source.with_name(source.stem + ".state.json"), source.with_name(
        source.stem + ".audit.jsonl"
    )


async def create_serving(
    config: Config, *, rng: random.Random | None = None, onnx_threads: int = 2
) -> Serving:
    """Build the run threads, the shared HTTP client and the first plan; the caller closes it."""
    runners = Runners.create(onnx_threads)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    stats = StatsBook()
    try:
        plan, _ = await create_plan(config, runners=runners, http=http, stats=stats)
    except BaseException:
        await http.close()
        runners.close()
        raise
    state_path, audit_path = state_paths(config)
    state = StateFile(state_path)
    audit = AuditLog(audit_path)
    serving = Serving(
        plan,
        stats=stats,
        runners=runners,
        http=http,
        rng=rng or random.Random(),
        state=state,
        audit=audit,
        alerts=Alerts(),
    )
    if state.load_error:
        serving.last_error = state.load_error
    start_plan(plan)
    audit.append(
        "start", digest=config.digest, models={m: mp.config.mode for m, mp in plan.models.items()}
    )
    return serving


async def close_serving(serving: Serving) -> None:
    await serving.close()
