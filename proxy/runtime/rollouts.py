"""The progressive canaries of the plan in force: one controller per canary model, kept across
reloads that do not change its rollout."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from proxy.config.schema import VersionKey
from proxy.monitoring.alerts import Alerts
from proxy.monitoring.watch import Watch
from proxy.routing.rollout import Audit, DecisionStore, RolloutController, rollout_key
from proxy.routing.strategy import create_strategy
from proxy.runtime.plan import Plan

log = logging.getLogger("mlproxy.rollout")


class Rollouts:
    """Builds, keeps and steps the rollout controllers; applies their weights to the plan."""

    def __init__(
        self,
        *,
        plan: Callable[[], Plan],
        watch: Watch,
        state: DecisionStore,
        audit: Audit,
        alerts: Alerts,
        clock: Callable[[], float],
    ) -> None:
        self._plan = plan
        self._watch = watch
        self._state = state
        self._audit = audit
        self._alerts = alerts
        self._clock = clock
        self._controllers: dict[str, RolloutController] = {}

    def get(self, model: str) -> RolloutController | None:
        return self._controllers.get(model)

    def controllers(self) -> dict[str, RolloutController]:
        return dict(self._controllers)

    def statuses(self) -> dict[str, str]:
        return {name: str(c.status) for name, c in self._controllers.items()}

    def attach(self, plan: Plan) -> None:
        """Controllers for a (new) plan: the same rollout keeps its step clock and counters."""
        controllers = {}
        now = self._clock()
        for name, mp in plan.models.items():
            c = mp.config.canary
            if mp.config.mode != "canary" or c is None or c.canary is None:
                continue
            old = self._controllers.get(name)
            if old is not None and old.key == rollout_key(mp.config):
                controllers[name] = old
                old.model = mp.config
                self._apply(name, old.weights())
                continue
            controllers[name] = RolloutController(
                mp.config,
                canary_stats=mp.stats[c.canary],
                stable_stats=mp.stats[mp.config.stable],
                state=self._state,
                audit=self._audit,
                alerts=self._alerts,
                apply=functools.partial(self._apply, name),
                now=now,
                drift=functools.partial(self._worst_drift, VersionKey(name, c.canary)),
            )
        for controller in controllers.values():
            controller.digest = plan.config.digest
        self._controllers = controllers

    def tick(self, now: float) -> None:
        """Step every controller (the scheduler calls it on a timer, after housekeeping)."""
        for controller in list(self._controllers.values()):
            try:
                controller.tick(now)
            except Exception:
                log.exception("rollout controller of %s failed", controller.model.name)

    def _worst_drift(self, key: VersionKey) -> tuple[str, float] | None:
        """The version's most drifted distribution over its short window, as last judged."""
        vw = self._watch.versions.get(key)
        if vw is None or vw.monitor is None:
            return None
        judged = vw.monitor.judged.get("short")
        if judged is None:
            return None
        i = int(judged.psi.argmax())
        return vw.monitor.baseline.names[i], float(judged.psi[i])

    def _apply(self, model: str, weights: dict[str, float]) -> None:
        mp = self._plan().models.get(model)
        if mp is not None:
            mp.strategy = create_strategy(mp.config, weights)
