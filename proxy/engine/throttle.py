"""Repeated events logged at most once per interval, with how many there were."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(slots=True)
class _Tally:
    count: int = 0  # events since the last one that was logged
    logged_at: float | None = None  # when one was last logged (None: never)


class LogThrottle:
    """Counts events per key and says when one should be logged: the first event of a key at
    once, then at most one per `interval_s`, carrying the count of events since the last logged
    one (the logged one included). Keys should come from a bounded set (a model and version, a
    cause), never from request data: every key seen is kept.

        n = throttle.hit(key)
        if n is not None:
            log.warning("... %d time(s) since the last message", n)
    """

    def __init__(self, interval_s: float, clock: Callable[[], float]) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, not {interval_s}")
        self.interval_s = interval_s
        self._clock = clock
        self._tallies: dict[Hashable, _Tally] = {}

    def hit(self, key: Hashable) -> int | None:
        """Count one event; the count to log when it is time to log one, else None."""
        t = self._tallies.get(key)
        if t is None:
            t = self._tallies[key] = _Tally()
        t.count += 1
        now = self._clock()
        if t.logged_at is not None and now - t.logged_at < self.interval_s:
            return None
        n, t.count, t.logged_at = t.count, 0, now
        return n

    def pending(self) -> dict[Hashable, int]:
        """Events counted but not yet logged, per key (for a last message at shutdown)."""
        return {k: t.count for k, t in self._tallies.items() if t.count}
