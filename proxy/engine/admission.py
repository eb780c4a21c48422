"""Admission: how many requests run at once (a limit on loop lag), and who waits or is shed.

Pure bookkeeping with the clock passed in: the data plane's connections (`http/connection.py`)
call it before any request object exists, so that a refused request costs a parse and a canned
answer, not a handler.

The physics it is built for (DESIGN section 8): past capacity, the loop saturates on HTTP
before any in-flight count grows, and a shed request is only as good as it is cheap. So:

* a request that finds a free slot runs at once;
* otherwise it waits, parsed but not built, in one queue for the whole process (waiting costs
  no CPU). How long it may wait depends on who is sending, which the server tells it (`held`):
  - **held** (closed loop): every client connection has a request waiting on us and no new
    ones are opening, so the load is bounded by the clients' own connections and a refusal
    only comes straight back (a resend costs CPU and buys nothing). By Little's law the wait is
    connections / throughput whatever we do; the queue is FIFO and a request may wait
    HELD_FACTOR x the deadline;
  - otherwise (open loop: arrivals that do not wait for our answers) the queue is controlled
    delay (CoDel, as Facebook's "Fail at Scale" applies it to server queues): a request may
    wait `deadline_s`, but once, at every admission for a CODEL_INTERVAL_S, the oldest request
    still waiting had waited more than CODEL_TARGET_S (a standing queue, not a burst) only
    CODEL_TARGET_S. A request's wait counts from when it arrived, which includes the loop's
    lateness in reading it. Once any request has been shed the queue is congested for
    CONGESTED_S (each shed renews it): LIFO, so that the newest, which can still be answered
    in time, go first (adaptive LIFO), and every wait capped at CONGESTED_WAIT_S. Without that
    memory the queue emptied by a shed went back to FIFO with the full deadline, filled, and
    every request of the next ~100 ms was admitted late (a sawtooth: admitted p99 ~140 ms at
    2 x capacity, measured);
* the number of slots follows the event loop's lag (AIMD, `AdaptiveLimit`): a window whose
  mean lag is over LAG_TARGET_S while the clients are not held cuts the limit by LAG_BACKOFF,
  a window under it in which the limit was used adds sqrt(limit), between `MIN_LIMIT` (one
  full micro-batch) and the configured ceiling; while they are held it is the ceiling.
  Envoy's adaptive concurrency and Netflix's Gradient2 follow latency against its floor
  instead; behind a micro-batcher that floor is a lone request's (a tenth of a batched
  one's), and the gradient starved the limit at 0.7 x capacity (measured).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

T = TypeVar("T", bound=Hashable)

MIN_LIMIT = 64  # one full micro-batch (max_batch_size): a smaller limit makes dearer batches;
# an adaptive limit also starts here
LAG_TARGET_S = 0.001  # the loop's mean lag over a window past this (open loop): cut the limit
LAG_BACKOFF = 0.8  # each window over the target multiplies the limit by this
HOLD_GROWTH = 2.0  # each window held multiplies the limit by this, up to the ceiling
PARKED_PER_SLOT = 8  # waiting requests at most, per slot of the ceiling; past it, shed at once
HELD_FACTOR = 10  # while the clients are held (closed loop), a request waits this x the deadline
CODEL_INTERVAL_S = 0.1  # the least wait over this long says whether the queue is standing
CODEL_TARGET_S = 0.010  # the wait allowed in a standing queue (open loop)
CONGESTED_S = 0.5  # open loop: after a shed, this long LIFO with waits capped at CONGESTED_WAIT_S
CONGESTED_WAIT_S = 0.005  # the wait allowed while congested (10 ms: 2x admitted p99 42.8 ms
# against 35.6, goodput 0.91 against 1.04 C, A/B of 3 reps); CODEL_TARGET_S stays 10 ms: a
# standing queue judged at 5 ms refused 8% at 0.7 x on this machine's loop jitter (run 4b)


class AdaptiveLimit:
    """A concurrency limit that follows the event loop's lag (AIMD); fixed when not adaptive.

    The server reports the loop's lag at every heartbeat (`beat`) and ends a window every
    REGIME_WINDOW_S (`window`). A window whose mean lag was over LAG_TARGET_S, with the clients
    not held, multiplies the limit by LAG_BACKOFF: the loop is saturated, every request waits
    unread for about that long, and admitting less frees the CPU it needs to read them. A
    window under the target in which the limit was at least half used adds sqrt(limit). While
    the clients are held (closed loop) the lag is the clients' own queue (Little's law): the
    limit grows by HOLD_GROWTH a window up to the ceiling, which keeps the micro-batches full
    and the queue fair. Not to the ceiling at once: a hold is a trial that an open-loop client
    fails within a window (it opens or uses more connections), and a jump to 512 slots had by
    then admitted eight batches, the last answered ~100 ms late (measured at 2 x capacity).

    Why lag and not admitted latency against its floor: behind a micro-batcher, latency at one
    request in flight (~0.2 ms here, a run at once) is a tenth of latency at a full batch, so a
    gradient against the floor cut the limit to its floor at 0.7 x capacity and shed 5-11% of
    the requests there (measured). A cap on the admitted rate instead of the in-flight count
    was tried and dropped: it refuses where a limit queues, and a loop saturated by healthy
    closed-loop load (wrk -c64) then sheds 3% (measured)."""

    def __init__(self, *, ceiling: int, adaptive: bool) -> None:
        self.ceiling = ceiling
        self.adaptive = adaptive
        self._limit = self._clamp(MIN_LIMIT)
        self._lag_sum_s = 0.0
        self._beats = 0
        self._peak = 0
        self._latency_sum_s = 0.0
        self._n = 0
        self.latency_s = 0.0  # mean admitted latency over the last window with answers
        self.lag_s = 0.0  # mean loop lag over the last window
        self._before_hold: float | None = None  # the limit a hold replaced with the ceiling

    @property
    def limit(self) -> int:
        return int(self._limit)

    def _clamp(self, limit: float) -> float:
        """Between MIN_LIMIT and the ceiling when adaptive (the ceiling if that is lower); the
        ceiling when not."""
        if not self.adaptive:
            return float(self.ceiling)
        return min(float(self.ceiling), max(float(MIN_LIMIT), limit))

    def configure(self, *, ceiling: int, adaptive: bool) -> None:
        """A reload's new ceiling (the limit reached is kept, under the new ceiling; turned on,
        it starts at MIN_LIMIT)."""
        start = self._limit if self.adaptive else MIN_LIMIT
        self.ceiling = ceiling
        self.adaptive = adaptive
        self._limit = self._clamp(start)

    def sample(self, latency_s: float, inflight: int) -> None:
        """One admitted request's time from admission to its answer; `inflight` is how many
        were admitted when it finished (the limit only grows while it is being used)."""
        self._latency_sum_s += latency_s
        self._n += 1
        if inflight > self._peak:
            self._peak = inflight

    def beat(self, lag_s: float) -> None:
        """The loop's lateness at one heartbeat."""
        self._lag_sum_s += lag_s
        self._beats += 1

    def window(self, *, held: bool) -> None:
        """The end of a window: move the limit (see the class docstring)."""
        lag = self._lag_sum_s / self._beats if self._beats else 0.0
        self.lag_s = lag
        if self._n:
            self.latency_s = self._latency_sum_s / self._n
        peak = self._peak
        self._lag_sum_s, self._beats, self._peak = 0.0, 0, 0
        self._latency_sum_s, self._n = 0.0, 0
        limit = self._limit
        if not held:
            self._before_hold = None
        elif self._before_hold is None:
            self._before_hold = limit
        if held:
            limit *= HOLD_GROWTH
        elif lag > LAG_TARGET_S:
            limit *= LAG_BACKOFF
        elif peak >= limit / 2:
            limit += math.sqrt(limit)
        self._limit = self._clamp(limit)

    def misjudged(self) -> None:
        """The hold just ended was wrong (open loop after all): back to the limit it replaced
        at once, not down from the ceiling a cut per window (ceiling-sized bursts then stalled
        the loop 50-170 ms for half a second, measured)."""
        if self._before_hold is not None:
            self._limit = self._clamp(self._before_hold)
            self._before_hold = None


class Admission(Generic[T]):
    """Slots and the one queue of requests waiting for one; tickets are the callers' own
    objects (a connection), handed back by `due` when they may run or must be refused."""

    def __init__(self, *, limit: AdaptiveLimit, deadline_s: float) -> None:
        self.limit = limit
        self.deadline_s = deadline_s
        self._inflight = 0
        self._waiting: deque[tuple[float, T]] = deque()  # (arrived, ticket), oldest first
        self._cancelled: set[T] = set()
        self._lifo = False
        self._shed_at = -math.inf  # when a request was last shed while not held
        self._interval_end = 0.0  # CoDel: the current interval's end, its least wait so far,
        self._least_wait_s = math.inf  # and whether the last one's least wait was over target
        self._standing = False
        self.held = False  # set by the server: the clients wait on us (closed loop)
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
        """True while congested (see `congested`): the newest go first."""
        return self._lifo

    def congested(self, now: float) -> bool:
        """Open loop, a request shed in the last CONGESTED_S: LIFO, waits capped at
        CONGESTED_WAIT_S."""
        return not self.held and now < self._shed_at + CONGESTED_S

    def configure(self, *, ceiling: int, adaptive: bool, deadline_s: float) -> None:
        self.limit.configure(ceiling=ceiling, adaptive=adaptive)
        self.deadline_s = deadline_s

    def max_wait_s(self, now: float) -> float:
        """How long a request may wait for a slot now (see the module docstring)."""
        if self.held:
            return HELD_FACTOR * self.deadline_s
        if self.congested(now):
            return min(self.deadline_s, CONGESTED_WAIT_S)
        if self._standing and now < self._interval_end + CODEL_INTERVAL_S:
            return min(self.deadline_s, CODEL_TARGET_S)
        return self.deadline_s

    @property
    def standing(self) -> bool:
        """Did every request admitted in the last CoDel interval wait past the target?"""
        return self._standing

    def _admitted(self, waited_s: float, now: float) -> None:
        """A request took a slot after waiting `waited_s` since it arrived. What CoDel sees is
        the oldest wait still queued behind it (LIFO serves the newest at once, so the served
        one's own wait says nothing about a standing queue), or its own if none is."""
        if self._waiting:
            waited_s = max(waited_s, now - self._waiting[0][0])
        self._inflight += 1
        self.admitted_total += 1
        if now >= self._interval_end:
            late = now >= self._interval_end + CODEL_INTERVAL_S  # a quiet gap: start afresh
            least = self._least_wait_s  # inf: none admitted in the interval (stuck, or idle)
            stuck = least != math.inf or bool(self._waiting)
            self._standing = not late and stuck and least > CODEL_TARGET_S
            self._least_wait_s = math.inf
            self._interval_end = now + CODEL_INTERVAL_S
        if waited_s < self._least_wait_s:
            self._least_wait_s = waited_s

    def arrive(self, ticket: T, arrived: float, now: float | None = None) -> bool | None:
        """A request that arrived at `arrived` (read at `now`, later when the loop was late):
        True: run now (a slot is taken). False: wait; `due` hands it back. None: shed at once
        (the queue is full)."""
        if self.take_free(arrived, arrived if now is None else now):
            return True
        if self.full:
            self.refuse()
            if not self.held:
                self._shed_at = arrived if now is None else now
            return None
        self._waiting.append((arrived, ticket))
        self.waited_total += 1
        return False

    def take_free(self, arrived: float, now: float) -> bool:
        """Take a slot if one is free and nobody waits (True); else change nothing (False:
        the caller goes through `arrive`)."""
        if self._waiting or self._inflight >= self.limit.limit:
            return False
        self._admitted(now - arrived, now)
        return True

    @property
    def full(self) -> bool:
        """No room to wait: a request that finds no slot now is refused at once."""
        return len(self._waiting) >= PARKED_PER_SLOT * self.limit.ceiling

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

    def due(self, now: float) -> tuple[list[T], list[T]]:
        """(tickets that may run now, each holding a slot; tickets past their deadline, to
        refuse). Call after `release`, and from a timer while any ticket waits."""
        shed: list[T] = []
        queue, cancelled = self._waiting, self._cancelled
        for _ in range(2):  # a first shed congests the queue: the shorter wait applies at once
            oldest_ok = now - self.max_wait_s(now)
            while queue and queue[0][0] <= oldest_ok:
                _, ticket = queue.popleft()
                if ticket in cancelled:
                    cancelled.discard(ticket)
                    continue
                shed.append(ticket)
            if not shed or self.held:
                break
            self._shed_at = now
        self.shed_total += len(shed)
        self._lifo = self.congested(now)
        run: list[T] = []
        limit = self.limit.limit
        while queue and self._inflight < limit:
            arrived, ticket = queue.pop() if self._lifo else queue.popleft()
            if ticket in cancelled:
                cancelled.discard(ticket)
                continue
            self._admitted(now - arrived, now)
            run.append(ticket)
        if not queue:
            cancelled.clear()
        return run, shed

    def next_due_s(self, now: float) -> float:
        """Seconds until the oldest waiter passes its deadline (0 if it has)."""
        if not self._waiting:
            return 0.0
        return max(self._waiting[0][0] + self.max_wait_s(now) - now, 0.0)

    def admit_all(self) -> list[T]:
        """Every waiting ticket, each given a slot past the limit (a drain answers them all)."""
        run = [t for _, t in self._waiting if t not in self._cancelled]
        self._waiting.clear()
        self._cancelled.clear()
        self._inflight += len(run)
        self.admitted_total += len(run)
        return run


# Are the clients held (closed loop: every connection waits on us, none opening)? Judged once a
# window while requests wait or are refused. Held: at most SPARE_SHARE of the connections active
# in the last ACTIVE_WINDOWS sat idle through the window, and in the last window the connections
# opened were at most CHURN_SHARE of the requests admitted (and CHURN_MIN). A client whose load
# does not wait for our answers opens more connections when we hold it (open loop: about as
# many as we are short of), while a closed-loop client's last connections trickle in. More
# opening than that while held ends the hold at once, and so do more requests outstanding than
# the connections active when it began (plus those opened since) can send, one each: an
# open-loop client with a pool of idle connections (a LIFO pool leaves thousands idle) opens
# none, but sends on connections we had counted idle. Either way the limit goes back to what
# it was before the hold, and the next hold is not tried for HOLD_BACKOFF_S, doubling up to
# HOLD_BACKOFF_MAX_S, until the queue empties.
REGIME_WINDOW_S = 0.1
ACTIVE_WINDOWS = 10  # connections silent for longer are idle keep-alives, not clients now
SPARE_SHARE = 0.25
CHURN_MIN = 8
CHURN_SHARE = 0.1
HOLD_BACKOFF_S = 1.0
HOLD_BACKOFF_MAX_S = 30.0


class Hold:
    """Sets `admission.held` from what the server counts (see REGIME_WINDOW_S). Pure, with the
    clock passed in; when a hold ends, the waiters' shorter deadlines apply from the server's
    next dispatch."""

    def __init__(self, admission: Admission[Any]) -> None:
        self.admission = admission
        self._accepts = 0  # connections opened in this window
        self._churn_limit = float(CHURN_MIN)  # connections per window that end a hold
        self._quiet = False  # the last window opened no more than that
        self._admitted_mark = 0
        self._shed_mark = 0
        self.not_before = 0.0  # no hold before this (a hold ended by connections opening)
        self._backoff = HOLD_BACKOFF_S
        self.room = 0  # while held: requests the held clients can have outstanding, one each

    def opened(self, now: float) -> None:
        """A connection was made."""
        self._accepts += 1
        self.room += 1
        if self.admission.held and self._accepts > self._churn_limit:
            self._misjudged(now)

    def check(self, now: float) -> None:
        """Between windows (every heartbeat): more requests outstanding than the held
        connections can send ends the hold (see REGIME_WINDOW_S)."""
        a = self.admission
        if a.held and a.inflight + a.waiting > self.room:
            self._misjudged(now)

    def _misjudged(self, now: float) -> None:
        """The clients held do not wait on us after all (open loop): end the hold, give back
        the limit it replaced, and try the next only after a doubling backoff."""

        self.not_before = now + self._backoff
        self._backoff = min(2 * self._backoff, HOLD_BACKOFF_MAX_S)
        self.admission.held = False
        self.admission.limit.misjudged()

    def idle(self) -> None:
        """No connection is open (the heartbeat stops): whatever load there was is over, and
        the next is judged afresh, without the backoff the last one earned. (Without this, a
        closed-loop load that followed an open-loop one on the same server waited out a backoff
        of up to HOLD_BACKOFF_MAX_S, shedding, before it was held: measured 0.56 x capacity
        at 1,000 connections.)"""
        self.admission.held = False
        self.not_before = 0.0
        self._backoff = HOLD_BACKOFF_S
        self._accepts = 0

    def judge(self, now: float, census: Callable[[], tuple[int, int]]) -> None:
        """End of a window; `census()` counts (connections that sat idle through it, connections
        active in the last ACTIVE_WINDOWS or with a request waiting or running), asked only
        while requests wait or were refused."""
        a = self.admission
        admitted = a.admitted_total - self._admitted_mark
        shed = a.shed_total - self._shed_mark
        self._admitted_mark, self._shed_mark = a.admitted_total, a.shed_total
        self._churn_limit = max(float(CHURN_MIN), CHURN_SHARE * admitted)
        self._quiet = self._accepts <= self._churn_limit
        self._accepts = 0
        if not a.waiting and not shed:
            a.held = False  # the overload, if any, is over
            self._backoff = HOLD_BACKOFF_S
            return
        # (a queue emptied by refusals is still an overload: closed-loop clients refused at
        # once come straight back, and must be judged held)
        spare, active = census()
        saturated = spare <= SPARE_SHARE * active

        if a.held and not saturated:
            a.held = False
        elif not a.held and saturated and self._quiet and now >= self.not_before:
            a.held = True
            self.room = active + CHURN_MIN
