"""Progressive canary: step the canary's weight up while its gates hold, roll it back when not."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol

import numpy as np
import orjson

from proxy.config.schema import CanaryConfig, ModelConfig
from proxy.engine.stats import LatencyHistogram, VersionStats
from proxy.monitoring.alerts import AlertKind, Alerts

log = logging.getLogger("mlproxy.rollout")
Action = Literal["wait", "step", "promote", "rollback"]


class RolloutStatus(StrEnum):
    PROGRESSING = "progressing"  # stepping up while the gates hold
    HOLDING = "holding"  # gated, no steps: the weights stay, a failed gate rolls back
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


DONE = (RolloutStatus.PROMOTED, RolloutStatus.ROLLED_BACK)


class DecisionStore(Protocol):
    """Where rollout decisions survive a restart (runtime.state.StateFile is one)."""

    def get(self, model: str) -> dict[str, Any] | None: ...

    def put(self, model: str, entry: dict[str, Any] | None) -> None: ...


class Audit(Protocol):
    """Where every change of what is served is recorded (runtime.state.AuditLog is one)."""

    def append(self, event: str, **fields: Any) -> dict[str, Any]: ...


def rollout_key(model: ModelConfig) -> str:
    """Identifies one rollout: any edit of the canary table or of the two versions starts anew."""
    c = model.canary
    assert c is not None
    versions = {
        v: str(model.versions[v].path or model.versions[v].url)
        for v in (model.stable, c.canary)
        if v
    }
    doc = {
        "stable": model.stable,
        "canary": c.canary,
        "weights": c.weights,
        "steps": c.steps,
        "interval": c.step_interval_s,
        "gates": [
            c.gates.max_error_rate,
            c.gates.max_p99_ms,
            c.gates.min_agreement,
            c.gates.max_psi,
            c.gates.min_requests,
        ],
        "versions": versions,
    }
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


@dataclass(slots=True)
class _Mark:
    """Counters of the canary (and of its comparison with stable) when a step began."""

    requests: int
    errors: int
    latency: np.ndarray[Any, Any]
    label_rows: int
    agreed: int


@dataclass(frozen=True, slots=True)
class Window:
    """The canary's traffic since its current step began."""

    requests: int
    errors: int
    p99_ms: float | None
    compared: int
    agreement: float | None


class RolloutController:
    """Drives one model's canary; `tick(now)` is the step function (tests call it directly)."""

    def __init__(
        self,
        model: ModelConfig,
        *,
        canary_stats: VersionStats,
        stable_stats: VersionStats,
        state: DecisionStore,
        audit: Audit,
        alerts: Alerts,
        apply: Callable[[dict[str, float]], None],
        now: float,
        drift: Callable[[], tuple[str, float] | None] = lambda: None,
    ) -> None:
        c = model.canary
        assert c is not None and c.canary is not None
        self.model = model
        self.config: CanaryConfig = c
        self.canary: str = c.canary
        self.stable = model.stable
        self.key = rollout_key(model)
        self.digest = ""  # the config digest in force, for the audit log (Serving keeps it current)
        self._canary_stats = canary_stats
        self._stable_stats = stable_stats
        self._state = state
        self._audit = audit
        self._alerts = alerts
        self._apply = apply
        self._drift = drift  # the canary's worst (distribution, PSI), None until a window is full
        total = sum(c.weights.values())
        self.weight = 100.0 * c.weights[self.canary] / total
        self.status = RolloutStatus.PROGRESSING if c.steps else RolloutStatus.HOLDING
        self.cause = "config"
        saved = state.get(model.name)
        if (
            saved is not None
            and saved.get("key") == self.key
            and saved.get("canary") == self.canary
        ):
            self.weight = float(saved["weight"])
            self.status = RolloutStatus(saved["status"])
            self.cause = f"restored: {saved.get('cause', '')}"
        elif saved is not None:
            state.put(model.name, None)  # a different rollout: the old decision no longer applies
        self._step_started = now
        self._mark = self._take_mark()
        self._apply(self.weights())

    @property
    def step_started(self) -> float:
        """When the current step began, on the clock `tick(now)` is given."""
        return self._step_started

    def weights(self) -> dict[str, float]:
        return {self.stable: 100.0 - self.weight, self.canary: self.weight}

    def _take_mark(self) -> _Mark:
        cs, mirror = self._canary_stats, self._stable_stats.mirror
        return _Mark(
            cs.requests, cs.errors, cs.latency.counts.copy(), mirror.label_rows, mirror.agreed
        )

    def window(self) -> Window:
        cs, mirror, m = self._canary_stats, self._stable_stats.mirror, self._mark
        p99 = LatencyHistogram.since(cs.latency, m.latency).quantile(0.99)
        compared = mirror.label_rows - m.label_rows
        return Window(
            requests=cs.requests - m.requests,
            errors=cs.errors - m.errors,
            p99_ms=None if p99 is None else p99 * 1000.0,
            compared=compared,
            agreement=(mirror.agreed - m.agreed) / compared if compared else None,
        )

    def failed_gates(self, w: Window) -> list[str] | None:
        """Gates the window breaks; None while a gate has too few samples to judge."""
        g = self.config.gates
        if w.requests < g.min_requests:
            return None
        failed = []
        if g.max_error_rate is not None and w.errors / w.requests > g.max_error_rate:
            failed.append(
                f"error rate {w.errors / w.requests:.4f} > max_error_rate {g.max_error_rate}"
            )
        if g.max_p99_ms is not None and w.p99_ms is not None and w.p99_ms > g.max_p99_ms:
            failed.append(f"p99 {w.p99_ms:.2f} ms > max_p99_ms {g.max_p99_ms}")
        if g.max_psi is not None:
            worst = self._drift()
            if worst is None:
                return None
            name, value = worst
            if value > g.max_psi:
                failed.append(f"drift of {name}: PSI {value:.4f} > max_psi {g.max_psi}")
        if g.min_agreement is not None:
            if w.compared < g.min_requests:
                return None
            assert w.agreement is not None
            if w.agreement < g.min_agreement:
                failed.append(
                    f"agreement with {self.stable} {w.agreement:.4f} < min_agreement {g.min_agreement}"
                )
        return failed

    def tick(self, now: float) -> Action | None:
        if self.status in DONE:
            return None
        w = self.window()
        failed = self.failed_gates(w)
        if failed is None:
            return "wait"
        if failed:
            self.rollback(cause="gate failed: " + "; ".join(failed), window=w)
            return "rollback"
        if (
            self.status is not RolloutStatus.PROGRESSING
            or now - self._step_started < self.config.step_interval_s
        ):
            return None
        nxt = next((s for s in self.config.steps if s > self.weight), None)
        if nxt is None or nxt >= 100.0:
            self.promote(cause=f"gates held for {len(self.config.steps)} steps", window=w)
            return "promote"
        self._set(
            nxt,
            RolloutStatus.PROGRESSING,
            f"gates held for {self.config.step_interval_s:g} s",
            "rollout_step",
            w,
        )
        self._step_started = now
        self._mark = self._take_mark()
        return "step"

    def follow(self, weight: float, status: RolloutStatus) -> None:
        """Take a decision made elsewhere (a worker follows its supervisor's controller): the
        weights change here; the state file and the audit log are the decider's to write."""
        if (weight, status) == (self.weight, self.status):
            return
        self.weight, self.status, self.cause = weight, status, "the supervisor's decision"
        self._apply(self.weights())

    def promote(self, cause: str, window: Window | None = None) -> None:
        self._set(100.0, RolloutStatus.PROMOTED, cause, "rollout_promote", window)

    def rollback(self, cause: str, window: Window | None = None) -> None:
        self._set(0.0, RolloutStatus.ROLLED_BACK, cause, "rollout_rollback", window)
        self._alerts.raise_alert(
            AlertKind.CANARY_ROLLBACK,
            model=self.model.name,
            version=self.canary,
            message=f"canary {self.canary} of {self.model.name} rolled back to 0%: {cause}",
        )

    def _set(
        self, weight: float, status: RolloutStatus, cause: str, event: str, window: Window | None
    ) -> None:
        before = self.weight
        self.weight, self.status, self.cause = weight, status, cause
        self._apply(self.weights())
        entry = {
            "key": self.key,
            "canary": self.canary,
            "weight": weight,
            "status": str(status),
            "cause": cause,
        }
        self._state.put(self.model.name, entry)
        self._audit.append(
            event,
            model=self.model.name,
            digest=self.digest,
            canary=self.canary,
            weight_before=before,
            weight_after=weight,
            cause=cause,
            window=None
            if window is None
            else {
                "requests": window.requests,
                "errors": window.errors,
                "p99_ms": window.p99_ms,
                "compared": window.compared,
                "agreement": window.agreement,
            },
        )
        log.info(
            "rollout %s/%s: %.1f%% -> %.1f%% (%s)",
            self.model.name,
            self.canary,
            before,
            weight,
            cause,
        )

    def describe(self, now: float) -> dict[str, Any]:
        w = self.window()
        return {
            "canary": self.canary,
            "status": str(self.status),
            "weight": self.weight,
            "cause": self.cause,
            "steps": list(self.config.steps),
            "step_age_s": round(now - self._step_started, 3),
            "window": {
                "requests": w.requests,
                "errors": w.errors,
                "p99_ms": w.p99_ms,
                "compared": w.compared,
                "agreement": w.agreement,
            },
        }
