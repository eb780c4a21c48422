"""Protection for calls to something that can fail or hang: a circuit breaker and a retry budget.

Both are plain objects with an injected clock and no tasks or timers of their own: the caller
asks before each call (`allow`, `try_retry`) and reports after it (`success`, `failure`), so
tests drive them by moving the clock.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"  # calls go through; consecutive failures are counted
    OPEN = "open"  # calls are refused at once until the pause is over
    HALF_OPEN = "half_open"  # the pause is over: one trial call at a time decides


class Breaker:
    """Opens after `failures` failed calls in a row and refuses calls for `pause_s` seconds;
    then lets one trial call through (half-open): its success closes the breaker, its failure
    opens it for another pause. `opened=True` starts it open (a version not known to answer).

    Results of calls that were let through before the breaker opened and end while it is open
    change nothing: only the trial's verdict (or the first result after the pause) counts.
    """

    def __init__(
        self,
        *,
        failures: int,
        pause_s: float,
        clock: Callable[[], float],
        opened: bool = False,
    ) -> None:
        if failures < 1 or pause_s < 0:
            raise ValueError(f"failures must be >= 1 and pause_s >= 0, not {failures}, {pause_s}")
        self.failures = failures
        self.pause_s = pause_s
        self._clock = clock
        self._in_a_row = 0
        self._open_until: float | None = None  # None: closed; else open until then (half after)
        self._trial = False  # a half-open trial call is in flight
        self.opened_total = 0
        if opened:
            self.trip()

    # ---------------------------------------------------------------- readers (no transitions)

    def state(self) -> BreakerState:
        if self._open_until is None:
            return BreakerState.CLOSED
        if self._clock() < self._open_until:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def is_open(self) -> bool:
        """True while calls are refused outright (cheap while closed: no clock read)."""
        return self._open_until is not None and self._clock() < self._open_until

    @property
    def failures_in_a_row(self) -> int:
        return self._in_a_row

    def retry_in(self) -> float | None:
        """Seconds until a trial call is let through; None while closed, 0 when half-open."""
        if self._open_until is None:
            return None
        return max(0.0, self._open_until - self._clock())

    # ---------------------------------------------------------------- the call protocol

    def allow(self) -> bool:
        """May a call go out now? Closed: yes. Open: no. Half-open: yes for one trial at a time
        (the caller must then report `success`, `failure` or `release`)."""
        if self._open_until is None:
            return True
        if self._trial or self._clock() < self._open_until:
            return False
        self._trial = True
        return True

    def success(self) -> None:
        if self._open_until is not None and self._clock() < self._open_until:
            return  # a call let through before the breaker opened: not a verdict
        self._in_a_row = 0
        self._open_until = None
        self._trial = False

    def failure(self) -> bool:
        """Count one failed call; True when this failure opened the breaker."""
        if self._open_until is not None:
            if self._clock() < self._open_until:
                return False  # already open: an older call's failure
            self._in_a_row += 1
            self._trial = False
            self.trip()  # the half-open trial failed
            return True
        self._in_a_row += 1
        if self._in_a_row >= self.failures:
            self.trip()
            return True
        return False

    def release(self) -> None:
        """A call that was let through ended without a verdict (cancelled): free the trial."""
        self._trial = False

    def trip(self) -> None:
        """Open now, for one pause."""
        self._open_until = self._clock() + self.pause_s
        self.opened_total += 1


class RetryBudget:
    """How many retries calls may make: `ratio` of the calls made, plus `floor_per_s` a second,
    banked up to `cap` retries. Under an upstream that fails every call, retries add at most
    `ratio` to the load (plus the floor) instead of multiplying it: no retry storm.
    """

    def __init__(
        self,
        *,
        ratio: float,
        floor_per_s: float,
        cap: float,
        clock: Callable[[], float],
    ) -> None:
        if ratio < 0 or floor_per_s < 0 or cap < 1:
            raise ValueError(
                f"need ratio >= 0, floor_per_s >= 0, cap >= 1: {ratio}, {floor_per_s}, {cap}"
            )
        self.ratio = ratio
        self.floor_per_s = floor_per_s
        self.cap = cap
        self._clock = clock
        self._tokens = cap
        self._last = clock()
        self.retried = 0  # retries granted
        self.denied = 0  # retries refused for want of budget

    def called(self) -> None:
        """A first attempt was made: it earns `ratio` of a retry."""
        self._tokens = min(self.cap, self._tokens + self.ratio)

    def try_retry(self) -> bool:
        """Take one retry from the budget; False (and counted) when there is none."""
        now = self._clock()
        self._tokens = min(self.cap, self._tokens + (now - self._last) * self.floor_per_s)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.retried += 1
            return True
        self.denied += 1
        return False
