"""Admission: how many requests run at once (a gradient limit), and who waits or is shed.

Pure bookkeeping with the clock passed in: the data plane's connections (`http/connection.py`)
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
* the number of slots follows a gradient on admitted latency against its floor (as Envoy's
  adaptive concurrency and Netflix's concurrency-limits do): limit x min(1, tolerance x floor
  / recent latency) + sqrt(limit) while the limit is in use, smoothed, between `MIN_LIMIT` and
  the configured ceiling. The floor is the lowest recent latency seen, rising slowly
  (FLOOR_CREEP per window) so that it follows a slower machine or model.
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
FLOOR_CREEP = 0.002  # the floor rises this share per window unless a lower latency is seen
PARKED_PER_SLOT = 8  # waiting requests at most, per slot of the ceiling; past it, shed at once
PATIENT_FACTOR = 10  # a request resent at once after a 503 waits up to this x the deadline


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
        """The latency floor the gradient compares recent latency with."""
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
        floor = self._long_s
        self._long_s = recent_s if floor == 0.0 else min(floor * (1 + FLOOR_CREEP), recent_s)
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
        # (arrived, ticket), oldest first: requests held to the deadline, and patient ones
        # (resent at once after a 503: a closed-loop client), held to PATIENT_FACTOR x it
        self._waiting: deque[tuple[float, T]] = deque()
        self._patient: deque[tuple[float, T]] = deque()
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
        return len(self._waiting) + len(self._patient) - len(self._cancelled)

    @property
    def lifo(self) -> bool:
        """True while requests are being shed at their deadline: the newest go first."""
        return self._lifo

    def configure(self, *, ceiling: int, adaptive: bool, deadline_s: float) -> None:
        self.limit.configure(ceiling=ceiling, adaptive=adaptive)
        self.deadline_s = deadline_s

    def arrive(self, ticket: T, now: float, *, patient: bool = False) -> bool | None:
        """True: run now (a slot is taken). False: wait; `due` hands it back. None: shed at once
        (the queue is full). A patient ticket waits up to PATIENT_FACTOR x the deadline: a
        client that resends at once gains nothing from another refusal, and each costs CPU
        (closed loop: queue fairly, never refuse work that comes straight back)."""
        if self._inflight < self.limit.limit and not self._waiting and not self._patient:
            self._inflight += 1
            self.admitted_total += 1
            return True
        if self.full:
            self.refuse()
            return None
        (self._patient if patient else self._waiting).append((now, ticket))
        self.waited_total += 1
        return False

    @property
    def full(self) -> bool:
        """No room to wait: a request that finds no slot now is refused at once."""
        return len(self._waiting) + len(self._patient) >= PARKED_PER_SLOT * self.limit.ceiling

    def refuse(self) -> None:
        """Count a request refused at once, without waiting (the queue full, or it came late)."""
        self.shed_total += 1

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

    def _expire(self, queue: deque[tuple[float, T]], oldest_ok: float, shed: list[T]) -> None:
        cancelled = self._cancelled
        while queue and queue[0][0] <= oldest_ok:
            _, ticket = queue.popleft()
            if ticket in cancelled:
                cancelled.discard(ticket)
                continue
            shed.append(ticket)

    def _next(self) -> T:
        """The next ticket to run: the oldest (FIFO), or the newest while shedding (LIFO)."""
        w, p = self._waiting, self._patient
        if self._lifo:
            q = w if not p or (w and w[-1][0] >= p[-1][0]) else p
            return q.pop()[1]
        q = w if not p or (w and w[0][0] <= p[0][0]) else p
        return q.popleft()[1]

    def due(self, now: float) -> tuple[list[T], list[T]]:
        """(tickets that may run now, each holding a slot; tickets past their deadline, to
        refuse). Call after `release`, and from a timer while any ticket waits."""
        shed: list[T] = []
        self._expire(self._waiting, now - self.deadline_s, shed)
        self._expire(self._patient, now - PATIENT_FACTOR * self.deadline_s, shed)
        if shed:
            self.shed_total += len(shed)
            self._lifo = True
        run: list[T] = []
        limit = self.limit.limit
        cancelled = self._cancelled
        while (self._waiting or self._patient) and self._inflight < limit:
            ticket = self._next()
            if ticket in cancelled:
                cancelled.discard(ticket)
                continue
            self._inflight += 1
            self.admitted_total += 1
            run.append(ticket)
        if not self._waiting and not self._patient:
            self._lifo = False
            cancelled.clear()
        return run, shed

    def oldest_wait_s(self, now: float) -> float:
        """How long the waiter nearest its deadline has waited, as a share of a plain one's."""
        heads = [now - self._waiting[0][0]] if self._waiting else []
        if self._patient:
            heads.append((now - self._patient[0][0]) / PATIENT_FACTOR)
        return max(heads, default=0.0)

    def admit_all(self) -> list[T]:
        """Every waiting ticket, each given a slot past the limit (a drain answers them all)."""
        both = sorted([*self._waiting, *self._patient], key=lambda item: item[0])
        run = [t for _, t in both if t not in self._cancelled]
        self._waiting.clear()
        self._patient.clear()
        self._cancelled.clear()
        self._inflight += len(run)
        self.admitted_total += len(run)
        return run
