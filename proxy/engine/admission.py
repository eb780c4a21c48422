"""Admission: how many requests run at once (a gradient limit), and who waits or is shed.

Pure bookkeeping with the clock passed in: the data plane's connections (`http/transport.py`)
call it before any request object exists, so that a refused request costs a parse and a canned
answer, not a handler.

The physics it is built for (DESIGN section 8): past capacity, the loop saturates on HTTP
before any in-flight count grows, and a shed request is only as good as it is cheap. So:

* a request that finds a free slot runs at once;
* otherwise it waits, parsed but not built, in one queue for the whole process. Waiting costs
  no CPU, so clients that resend at once (closed loop) queue fairly, FIFO, and are never
  refused for work they already paid for as long as their wait stays under the deadline;
* once a request has waited `deadline_s` since it arrived it is shed (503 + Retry-After), and
  the queue turns LIFO until it empties: under an open-loop overload the newest requests, which
  can still be answered in time, go first, and the oldest, already late, are the ones refused
  (adaptive LIFO, as in Facebook's "Fail at Scale");
* the number of slots follows a gradient on admitted latency (Netflix concurrency-limits'
  Gradient2): limit x min(1, tolerance x long-term latency / recent latency) + sqrt(limit),
  smoothed, between `MIN_LIMIT` and the configured ceiling.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)

MIN_LIMIT = 8
TOLERANCE = 2.0  # recent latency may be this many times the long-term one before cutting
SMOOTHING = 0.2  # each update moves the limit this far toward its new value
WINDOW = 64  # latency samples per update
LONG_DECAY = 0.05  # the long-term latency's EWMA weight per update
PARKED_PER_SLOT = 8  # waiting requests at most, per slot of the ceiling; past it, shed at once


class AdaptiveLimit:
    """A concurrency limit that follows admitted latency (Gradient2); fixed when not adaptive."""

    def __init__(self, *, ceiling: int, adaptive: bool) -> None:
        self.ceiling = ceiling
        self.adaptive = adaptive
        self._limit = float(min(ceiling, 64) if adaptive else ceiling)
        self._long_s = 0.0
        self._sum_s = 0.0
        self._n = 0

    @property
    def limit(self) -> int:
        return max(MIN_LIMIT, int(self._limit)) if self.adaptive else self.ceiling

    @property
    def long_latency_s(self) -> float:
        return self._long_s

    def configure(self, *, ceiling: int, adaptive: bool) -> None:
        """A reload's new ceiling (the learnt latency is kept)."""
        self.ceiling = ceiling
        self.adaptive = adaptive
        self._limit = min(self._limit, float(ceiling))

    def sample(self, latency_s: float, inflight: int) -> None:
        """One admitted request's time from admission to its answer; `inflight` is how many
        were admitted when it finished (the limit only grows while it is being used)."""
        if not self.adaptive:
            return
        self._sum_s += latency_s
        self._n += 1
        if self._n >= WINDOW:
            self._update(self._sum_s / self._n, inflight)
            self._sum_s = 0.0
            self._n = 0

    def _update(self, recent_s: float, inflight: int) -> None:
        if self._long_s == 0.0:
            self._long_s = recent_s
        else:
            self._long_s += LONG_DECAY * (recent_s - self._long_s)
            if recent_s < self._long_s:
                # Latency fell (load went away): let the long-term figure follow quickly, or a
                # busy past would hold the limit high.
                self._long_s = recent_s + (self._long_s - recent_s) * 0.5
        gradient = min(1.0, max(0.5, TOLERANCE * self._long_s / recent_s)) if recent_s else 1.0
        limit = self._limit
        headroom = math.sqrt(limit) if inflight >= limit / 2 else 0.0
        target = limit * gradient + headroom
        self._limit = min(
            float(self.ceiling), max(float(MIN_LIMIT), limit + SMOOTHING * (target - limit))
        )


class Admission(Generic[T]):
    """Slots and the one queue of requests waiting for one; tickets are the callers' own
    objects (a connection), handed back by `due` when they may run or must be refused."""

    def __init__(self, *, limit: AdaptiveLimit, deadline_s: float) -> None:
        self.limit = limit
        self.deadline_s = deadline_s
        self._inflight = 0
        self._waiting: deque[tuple[float, T]] = deque()
        self._cancelled: set[T] = set()
        self._lifo = False
        self.admitted_total = 0
        self.shed_total = 0
        self.waited_total = 0

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def waiting(self) -> int:
        return len(self._waiting) - len(self._cancelled)

    @property
    def lifo(self) -> bool:
        """True while requests are being shed at their deadline: the newest go first."""
        return self._lifo

    def configure(self, *, ceiling: int, adaptive: bool, deadline_s: float) -> None:
        self.limit.configure(ceiling=ceiling, adaptive=adaptive)
        self.deadline_s = deadline_s

    def arrive(self, ticket: T, now: float) -> bool | None:
        """True: run now (a slot is taken). False: wait; `due` hands it back. None: shed at once
        (the queue is full)."""
        if self._inflight < self.limit.limit and not self._waiting:
            self._inflight += 1
            self.admitted_total += 1
            return True
        if len(self._waiting) >= PARKED_PER_SLOT * self.limit.ceiling:
            self.shed_total += 1
            return None
        self._waiting.append((now, ticket))
        self.waited_total += 1
        return False

    def take(self) -> None:
        """A slot past the limit and the queue (a drain answers every request received)."""
        self._inflight += 1
        self.admitted_total += 1

    def cancel(self, ticket: T) -> None:
        """A waiting ticket's connection went away: skip it when its turn comes."""
        self._cancelled.add(ticket)

    def release(self, latency_s: float) -> None:
        """An admitted request finished, `latency_s` after it was admitted."""
        self._inflight -= 1
        self.limit.sample(latency_s, self._inflight + 1)

    def due(self, now: float) -> tuple[list[T], list[T]]:
        """(tickets that may run now, each holding a slot; tickets past their deadline, to
        refuse). Call after `release`, and from a timer while any ticket waits."""
        shed: list[T] = []
        waiting = self._waiting
        cancelled = self._cancelled
        oldest_ok = now - self.deadline_s
        while waiting and waiting[0][0] <= oldest_ok:
            _, ticket = waiting.popleft()
            if ticket in cancelled:
                cancelled.discard(ticket)
                continue
            shed.append(ticket)
        if shed:
            self.shed_total += len(shed)
            self._lifo = True
        run: list[T] = []
        limit = self.limit.limit
        while waiting and self._inflight < limit:
            _, ticket = waiting.pop() if self._lifo else waiting.popleft()
            if ticket in cancelled:
                cancelled.discard(ticket)
                continue
            self._inflight += 1
            self.admitted_total += 1
            run.append(ticket)
        if not waiting:
            self._lifo = False
            cancelled.clear()
        return run, shed

    def oldest_wait_s(self, now: float) -> float:
        return now - self._waiting[0][0] if self._waiting else 0.0

    def admit_all(self) -> list[T]:
        """Every waiting ticket, each given a slot past the limit (a drain answers them all)."""
        run = [t for _, t in self._waiting if t not in self._cancelled]
        self._waiting.clear()
        self._cancelled.clear()
        self._inflight += len(run)
        self.admitted_total += len(run)
        return run
