"""Reloading config.toml while serving: notice the change, build the new plan beside the old,
warm it, swap one reference, retire the old plan once its last request has left."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from proxy.config.load import load_config
from proxy.engine.counters import Counters, ReloadOutcome
from proxy.engine.runner import Runners
from proxy.errors import ConfigError
from proxy.runtime.current import Current
from proxy.runtime.plan import Plan, close_plan, create_plan, start_plan
from proxy.runtime.state import AuditLog
from proxy.runtime.tasks import Tasks

log = logging.getLogger("mlproxy")
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
        """True once per change (the step function: the scheduler calls it on a timer)."""
        sig = self.signature()
        if sig is None or sig == self._last:
            return False
        self._last = sig
        return True


class Reloader:
    """Serialised reloads. A config that fails anywhere changes nothing: the running plan keeps
    serving, and the error stays in `last_error` until a good reload clears it."""

    def __init__(
        self,
        current: Current,
        *,
        runners: Runners,
        http: aiohttp.ClientSession,
        counters: Counters,
        audit: AuditLog,
        tasks: Tasks,
        on_swap: Callable[[Plan], None],
    ) -> None:
        self._current = current
        self._runners = runners
        self._http = http
        self._counters = counters
        self._audit = audit
        self._tasks = tasks
        self._on_swap = on_swap
        self._after_swap: list[Callable[[Plan], None]] = []
        self._lock = asyncio.Lock()
        self.config_path = Path(current.plan.config.source)
        self.last_error: str | None = None
        self._refusal_shown = False  # last_error is a refused reload's (not, say, the state file's)

    def after_swap(self, callback: Callable[[Plan], None]) -> None:
        """Call `callback` with every plan a reload puts in force (the supervisor forwards
        SIGHUP to its workers: a reload it refused is refused for all)."""
        self._after_swap.append(callback)

    async def reload(self, cause: str, *, only_if_changed: bool = False) -> dict[str, Any]:
        """Validate the config file, load what is new or changed, warm it, then swap the plan."""
        async with self._lock:
            before = self._current.plan.config.digest
            try:
                config = load_config(self.config_path)
                if only_if_changed and config.digest == before:
                    self._back_to_running(cause, before)
                    return {"outcome": "unchanged", "digest": before}
                plan, loaded = await create_plan(
                    config,
                    runners=self._runners,
                    http=self._http,
                    counters=self._counters,
                    previous=self._current.plan,
                )
            except ConfigError as exc:
                return self._refused(cause, before, exc)
            self._swap(plan)
            self._counters.reload(ReloadOutcome.OK)
            self.last_error = None
            self._refusal_shown = False
            self._audit.append(
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

    def _back_to_running(self, cause: str, digest: str) -> None:
        """The file holds the config in force again (a bad edit undone, a deleted file put
        back): a refusal shown for the file that was there before no longer applies."""
        if self.last_error is not None and self._refusal_shown:
            self.last_error = None
            self._refusal_shown = False
            log.info("config file (%s) is the config in force again, %s", cause, digest[:12])

    def _refused(self, cause: str, before: str, exc: ConfigError) -> dict[str, Any]:
        self._counters.reload(ReloadOutcome.ERROR)
        self.last_error = str(exc)
        self._refusal_shown = True
        log.error("reload (%s) refused; still serving %s:\n%s", cause, before[:12], exc)
        self._audit.append("reload_refused", cause=cause, digest=before, errors=exc.errors)
        return {"outcome": "error", "errors": [f"{exc.source}:{e}" for e in exc.errors]}

    def _swap(self, plan: Plan) -> None:
        old = self._current.plan
        for section in RESTART_ONLY:
            if getattr(plan.config, section) != getattr(old.config, section):
                log.warning("[%s] changed: it takes effect at the next restart", section)
        self._current.swap(plan)
        self._on_swap(plan)
        start_plan(plan)
        old.retire()
        self._tasks.spawn(self._close_when_idle(old, plan))
        for callback in self._after_swap:
            callback(plan)

    async def _close_when_idle(self, old: Plan, new: Plan) -> None:
        await old.idle.wait()  # its last request has left
        await close_plan(old, keep=new.backends() | self._current.plan.backends())
