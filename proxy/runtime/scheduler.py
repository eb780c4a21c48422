"""The serving process's one timer: measure the loop, follow the config file, judge the
monitors, step the rollouts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import perf_counter, thread_time

from proxy.monitoring.watch import Watch
from proxy.runtime.current import Current
from proxy.runtime.load import LoopLoad
from proxy.runtime.reloader import ConfigWatcher, Reloader
from proxy.runtime.rollouts import Rollouts

log = logging.getLogger("mlproxy")
WATCH_INTERVAL_S = 0.25
TICK_INTERVAL_S = 0.5


class Scheduler:
    """Runs the periodic jobs; each has a step function tests call instead of waiting."""

    def __init__(
        self,
        *,
        current: Current,
        reloader: Reloader,
        watch: Watch,
        rollouts: Rollouts,
        load: LoopLoad,
        clock: Callable[[], float],
    ) -> None:
        self._current = current
        self._reloader = reloader
        self._watch = watch
        self._rollouts = rollouts
        self._load = load
        self._clock = clock
        self._next_tick = 0.0

    def housekeeping(self, now: float | None = None) -> None:
        """Monitoring's periodic step: bin buffered rows, judge windows, raise or clear alerts."""
        now = self._clock() if now is None else now
        self._watch.housekeeping(now, self._current.plan, loop_lag_s=self._load.lag_s)

    def tick(self, now: float | None = None) -> None:
        """Step every rollout controller."""
        self._rollouts.tick(self._clock() if now is None else now)

    def measure(self, elapsed_s: float, interval_s: float, cpu_s: float) -> None:
        """Take one interval's measurement of the loop: lag, CPU share (mirrors yield)."""
        self._load.lag(elapsed_s - interval_s)
        self._load.measure(cpu_s / elapsed_s, self._current.plan)

    async def run(
        self,
        *,
        watch_file: bool = True,
        step_rollouts: bool = True,
        every: Callable[[], None] | None = None,
    ) -> None:
        """Until cancelled: every WATCH_INTERVAL_S measure, reload on a file change, call
        `every` (a worker publishes its counts, a supervisor pools them), judge; every
        TICK_INTERVAL_S step the rollouts (after judging, so gates see current drift).
        A supervisor's worker neither watches the file (the supervisor reloads first and
        forwards SIGHUP) nor steps rollouts (the supervisor's controllers decide for all)."""
        watcher = ConfigWatcher(self._reloader.config_path) if watch_file else None
        while True:
            before, cpu_before = perf_counter(), thread_time()
            await asyncio.sleep(WATCH_INTERVAL_S)  # a timer, not a synchronisation: these jobs poll
            self.measure(perf_counter() - before, WATCH_INTERVAL_S, thread_time() - cpu_before)
            if watcher is not None and watcher.check():
                try:
                    await self._reloader.reload("file changed", only_if_changed=True)
                except Exception:  # never let one bad reload stop watching
                    log.exception("reload after a file change failed")
            now = self._clock()
            if every is not None:
                try:
                    every()
                except Exception:
                    log.exception("publishing or pooling counts failed")
            try:
                self.housekeeping(now)
            except Exception:
                log.exception("monitoring housekeeping failed")
            if step_rollouts and now >= self._next_tick:
                self.tick(now)
                self._next_tick = now + TICK_INTERVAL_S
