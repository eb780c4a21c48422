"""Overload, seen from inside: event-loop lag or queue waits held too long raise one alert."""

from __future__ import annotations

from proxy.config.schema import AlertsConfig
from proxy.monitoring.alerts import AlertKind, Alerts

KEY = "overload"


class OverloadWatch:
    """Fires `overload` once the loop lag (or a batch queue's wait) has stayed over its limit for
    `overload_for_s`, and resolves it when both are back under."""

    def __init__(self, alerts: Alerts) -> None:
        self._alerts = alerts
        self._since: float | None = None

    def check(
        self,
        now: float,
        *,
        config: AlertsConfig,
        lag_s: float,
        waits: list[float],
        wait_limit_s: float,
    ) -> None:
        lag_ms = round(lag_s * 1000, 3)
        hot = lag_s * 1000.0 > config.overload_lag_ms or any(w > wait_limit_s for w in waits)
        if not hot:
            self._since = None
            self._alerts.resolve(KEY, "load back to normal", loop_lag_ms=lag_ms)
            return
        if self._since is None:
            self._since = now
        if now - self._since >= config.overload_for_s:
            self._alerts.fire(
                KEY,
                AlertKind.OVERLOAD,
                model="*",
                version=None,
                message=(
                    f"overloaded for {now - self._since:.1f} s: event-loop lag"
                    f" {lag_s * 1000:.0f} ms (limit {config.overload_lag_ms:g}),"
                    f" longest queue wait {max(waits, default=0) * 1000:.0f} ms"
                ),
                loop_lag_ms=lag_ms,
            )
