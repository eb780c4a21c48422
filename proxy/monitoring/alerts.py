"""Alerts: each fires once when its condition starts and once when it clears, through one path."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import orjson

log = logging.getLogger("mlproxy.alerts")
MAX_ALERTS = 1000


class AlertKind(StrEnum):
    DRIFT = "drift"
    CONCEPT_DRIFT = "concept_drift"
    OVERLOAD = "overload"
    DUPLICATE_INPUTS = "duplicate_inputs"
    CANARY_ROLLBACK = "canary_rollback"


class AlertState(StrEnum):
    FIRING = "firing"  # a condition started
    RESOLVED = "resolved"  # ...and cleared
    EVENT = "event"  # a one-off, such as a rollback: it has no clearing


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert as logged, listed by GET /admin/alerts and posted to the webhook."""

    ts: float
    kind: AlertKind
    state: AlertState
    model: str
    version: str | None
    message: str
    details: dict[str, Any] = field(default_factory=dict)  # feature, statistic, value, window...

    def to_json(self) -> dict[str, Any]:
        """The flat JSON document clients see: the fixed fields, then the details."""
        return {
            "ts": self.ts,
            "kind": str(self.kind),
            "state": str(self.state),
            "model": self.model,
            "version": self.version,
            "message": self.message,
            **self.details,
        }


Listener = Callable[[Alert], None]


class Alerts:
    """Every alert takes one path: a structured log line, the list behind GET /admin/alerts, and
    the listeners (the webhook). A condition alert fires once when it starts (`fire`) and once when
    it clears (`resolve`), never per request; `raise_alert` records a one-off (a rollback)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._history: deque[Alert] = deque(maxlen=MAX_ALERTS)
        self._open: dict[str, Alert] = {}
        self._listeners: list[Listener] = []
        self._raised = 0

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unlisten(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def _emit(self, alert: Alert) -> Alert:
        self._history.append(alert)
        self._raised += 1
        level = logging.WARNING if alert.state is not AlertState.RESOLVED else logging.INFO
        log.log(level, "ALERT %s", orjson.dumps(alert.to_json()).decode())
        for listener in self._listeners:
            listener(alert)
        return alert

    def fire(
        self,
        key: str,
        kind: AlertKind,
        *,
        model: str,
        version: str | None,
        message: str,
        **details: Any,
    ) -> bool:
        """Open the alert `key` unless it is open already; True when it fired now."""
        if key in self._open:
            return False
        alert = Alert(self._now(), kind, AlertState.FIRING, model, version, message, details)
        self._open[key] = alert
        self._emit(alert)
        return True

    def resolve(self, key: str, message: str, **details: Any) -> bool:
        """Close the alert `key` if it is open; True when it cleared now. The resolution keeps
        the details it fired with, updated by `details`."""
        opened = self._open.pop(key, None)
        if opened is None:
            return False
        self._emit(
            replace(
                opened,
                ts=self._now(),
                state=AlertState.RESOLVED,
                message=message,
                details={**opened.details, **details},
            )
        )
        return True

    def raise_alert(
        self, kind: AlertKind, *, model: str, version: str | None, message: str, **details: Any
    ) -> Alert:
        """A one-off alert (an event, such as a rollback): it has no clearing."""
        return self._emit(
            Alert(self._now(), kind, AlertState.EVENT, model, version, message, details)
        )

    def _now(self) -> float:
        return round(self._clock(), 6)

    @property
    def raised(self) -> int:
        """Alerts emitted since start (firing, resolved and events)."""
        return self._raised

    def recent(self) -> list[Alert]:
        return list(self._history)

    def open_alerts(self) -> list[Alert]:
        return list(self._open.values())
