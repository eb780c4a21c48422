"""Alerts: each fires once when its condition starts and once when it clears, through one path."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

log = logging.getLogger("mlproxy.alerts")
MAX_ALERTS = 1000


class Alerts:
    """Every alert takes one path: a structured log line, the list behind GET /admin/alerts, and
    the listeners (the webhook). A condition alert fires once when it starts (`fire`) and once when
    it clears (`resolve`), never per request; `event` records a one-off (a rollback)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.history: deque[dict[str, Any]] = deque(maxlen=MAX_ALERTS)
        self.open: dict[str, dict[str, Any]] = {}
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.raised = 0

    def _emit(self, alert: dict[str, Any]) -> dict[str, Any]:
        self.history.append(alert)
        self.raised += 1
        level = logging.WARNING if alert["state"] != "resolved" else logging.INFO
        log.log(level, "ALERT %s", orjson.dumps(alert).decode())
        for listener in self.listeners:
            listener(alert)
        return alert

    def _alert(
        self, state: str, kind: str, model: str, version: str | None, message: str, **fields: Any
    ) -> dict[str, Any]:
        return {
            "ts": round(self._clock(), 6),
            "kind": kind,
            "state": state,
            "model": model,
            "version": version,
            "message": message,
            **fields,
        }

    def fire(
        self, key: str, kind: str, *, model: str, version: str | None, message: str, **fields: Any
    ) -> bool:
        """Open the alert `key` unless it is open already; True when it fired now."""
        if key in self.open:
            return False
        alert = self._alert("firing", kind, model, version, message, **fields)
        self.open[key] = alert
        self._emit(alert)
        return True

    def resolve(self, key: str, message: str, **fields: Any) -> bool:
        """Close the alert `key` if it is open; True when it cleared now."""
        opened = self.open.pop(key, None)
        if opened is None:
            return False
        self._emit(
            self._alert(
                "resolved",
                opened["kind"],
                opened["model"],
                opened["version"],
                message,
                **{
                    **{
                        k: v
                        for k, v in opened.items()
                        if k not in ("ts", "kind", "state", "model", "version", "message")
                    },
                    **fields,
                },
            )
        )
        return True

    def raise_alert(
        self, kind: str, *, model: str, version: str | None, message: str, **fields: Any
    ) -> dict[str, Any]:
        """A one-off alert (an event, such as a rollback): it has no clearing."""
        return self._emit(self._alert("event", kind, model, version, message, **fields))

    def recent(self) -> list[dict[str, Any]]:
        return list(self.history)

    def open_alerts(self) -> list[dict[str, Any]]:
        return list(self.open.values())
