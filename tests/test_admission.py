"""Admission's bookkeeping, driven by its step methods with the clock passed in: slots, the FIFO
queue, the deadline measured from arrival, LIFO while shedding, and the lag-driven limit."""

from __future__ import annotations

from proxy.engine.admission import (
    CHURN_MIN,
    CODEL_INTERVAL_S,
    CODEL_TARGET_S,
    CONGESTED_S,
    CONGESTED_WAIT_S,
    HELD_FACTOR,
    HOLD_GROWTH,
    LAG_BACKOFF,
    LAG_TARGET_S,
    MIN_LIMIT,
    PARKED_PER_SLOT,
    AdaptiveLimit,
    Admission,
    Hold,
)


def fixed(n: int, deadline_s: float = 0.1) -> Admission[str]:
    return Admission(limit=AdaptiveLimit(ceiling=n, adaptive=False), deadline_s=deadline_s)


def test_slots_then_a_fifo_queue_then_the_deadline_from_arrival() -> None:
    a = fixed(2)
    assert a.arrive("a", 0.0) is True and a.arrive("b", 0.0) is True
    assert a.arrive("c", 0.01) is False and a.arrive("d", 0.02) is False
    assert a.waiting == 2 and a.inflight == 2
    a.release(0.005)
    run, shed = a.due(0.03)
    assert (run, shed) == (["c"], [])  # the oldest waiter first
    # d arrived at 0.02: at 0.121 it has waited past 100 ms and is shed
    assert a.due(0.119) == ([], [])
    run, shed = a.due(0.121)
    assert (run, shed) == ([], ["d"]) and a.shed_total == 1
    assert a.lifo  # congested: a shed in the last CONGESTED_S, though the queue is empty
    assert a.max_wait_s(0.122) == CONGESTED_WAIT_S
    assert a.due(0.121 + CONGESTED_S) == ([], [])
    assert not a.lifo and a.max_wait_s(0.121 + CONGESTED_S) == 0.1  # no shed for CONGESTED_S


def test_after_a_shed_the_newest_go_first_and_wait_at_most_the_congested_wait() -> None:
    """Congested (a shed in the last CONGESTED_S, open loop): LIFO, and a wait past
    CONGESTED_WAIT_S is shed, so the queue that a shed emptied does not refill FIFO with the
    full deadline (which admitted every request of the next ~100 ms late)."""
    a = fixed(1)
    assert a.arrive("x", 0.0) is True
    for i, t in enumerate((0.00, 0.05, 0.0985, 0.099)):
        assert a.arrive(f"w{i}", t) is False
    run, shed = a.due(0.101)  # w0 is past its deadline; w1 past the congested wait now
    assert shed == ["w0", "w1"] and run == [] and a.lifo
    a.release(0.1)
    run, shed = a.due(0.102)
    assert run == ["w3"] and shed == []  # the newest waiter
    a.release(0.001)
    run, _ = a.due(0.103)
    assert run == ["w2"]
    a.arrive("y", 0.104)  # a slot is taken: y waits
    a.release(0.001)
    a.arrive("z", 0.105)
    run, shed = a.due(0.1045 + CONGESTED_WAIT_S)  # y is 5.5 ms old: shed; z runs
    assert (run, shed) == (["z"], ["y"]) and a.lifo


def test_cancelled_waiters_are_skipped_and_a_drain_admits_all() -> None:
    a = fixed(1)
    a.arrive("x", 0.0)
    for w in ("p", "q", "r"):
        a.arrive(w, 0.0)
    a.cancel("q")
    assert a.waiting == 2
    assert a.admit_all() == ["p", "r"] and a.inflight == 3 and a.waiting == 0
    a.take()
    assert a.inflight == 4


def test_a_full_queue_sheds_at_once() -> None:
    a = fixed(1)
    a.arrive("x", 0.0)
    for i in range(PARKED_PER_SLOT):
        assert a.arrive(f"w{i}", 0.0) is False
    assert a.arrive("late", 0.0) is None and a.shed_total == 1


def run_windows(
    lim: AdaptiveLimit, n: int, *, lag_s: float, inflight: int | None, held: bool
) -> None:
    """n windows of 20 heartbeats at `lag_s`, each with one answer at `inflight` (None: the
    limit, i.e. fully used)."""
    for _ in range(n):
        for _ in range(20):
            lim.beat(lag_s)
        lim.sample(0.002, inflight=lim.limit if inflight is None else inflight)
        lim.window(held=held)


def test_the_limit_cuts_on_loop_lag_in_open_loop_and_grows_while_used() -> None:
    lim = AdaptiveLimit(ceiling=512, adaptive=True)
    assert lim.limit == MIN_LIMIT == 64  # it starts at its floor
    run_windows(lim, 5, lag_s=0.0, inflight=None, held=False)  # a quiet loop, limit in use
    grown = lim.limit
    assert grown > 64 + 4 * 8  # + sqrt(limit) a window
    assert lim.latency_s == 0.002 and lim.lag_s == 0.0
    run_windows(lim, 2, lag_s=3 * LAG_TARGET_S, inflight=None, held=False)
    assert abs(lim.limit - grown * LAG_BACKOFF**2) < 2
    assert abs(lim.lag_s - 3 * LAG_TARGET_S) < 1e-12
    run_windows(lim, 100, lag_s=3 * LAG_TARGET_S, inflight=None, held=False)
    assert lim.limit == MIN_LIMIT == 64  # never under the floor: one full micro-batch
    run_windows(lim, 200, lag_s=0.0, inflight=None, held=False)
    assert lim.limit == 512  # never past the ceiling


def test_held_clients_grow_to_the_ceiling_and_idle_ones_never_grow_the_limit() -> None:
    held = AdaptiveLimit(ceiling=512, adaptive=True)
    run_windows(held, 1, lag_s=10 * LAG_TARGET_S, inflight=None, held=True)
    assert held.limit == 64 * HOLD_GROWTH  # lag in closed loop is the clients' own queue
    run_windows(held, 2, lag_s=10 * LAG_TARGET_S, inflight=None, held=True)
    assert held.limit == 512  # the ceiling three windows in: full batches, FIFO
    run_windows(held, 1, lag_s=10 * LAG_TARGET_S, inflight=None, held=False)
    assert held.limit == int(512 * LAG_BACKOFF)  # the hold over, the lag cuts again
    idle = AdaptiveLimit(ceiling=512, adaptive=True)
    run_windows(idle, 20, lag_s=0.0, inflight=2, held=False)
    assert idle.limit == 64  # fast answers, few in flight: no reason to grow
    off = AdaptiveLimit(ceiling=100, adaptive=False)
    run_windows(off, 20, lag_s=10 * LAG_TARGET_S, inflight=None, held=False)
    assert off.limit == 100
    off.configure(ceiling=200, adaptive=True)  # turned on by a reload: starts where a new one does
    assert off.limit == 64
    off.configure(ceiling=32, adaptive=True)  # a lower ceiling caps what was reached
    assert off.limit == 32
    tiny = AdaptiveLimit(ceiling=1, adaptive=True)  # a ceiling under the floor is the limit
    run_windows(tiny, 3, lag_s=0.0, inflight=None, held=False)
    assert tiny.limit == 1


def test_held_clients_wait_fifo_for_longer_and_are_never_served_lifo() -> None:
    """Closed loop (the server says the clients are held): FIFO, HELD_FACTOR deadlines, and a
    shed does not turn the queue LIFO (the oldest would starve behind resends)."""
    a = fixed(1)
    a.held = True
    a.arrive("x", 0.0)
    assert a.arrive("old", 0.00) is False and a.arrive("new", 0.05) is False
    assert a.max_wait_s(0.2) == HELD_FACTOR * 0.1
    assert a.due(0.2) == ([], [])  # past 100 ms, within 10 deadlines
    a.release(0.2)
    assert a.due(0.21) == (["old"], [])  # the oldest first
    a.release(0.01)
    a.take()  # (a slot taken elsewhere: the next waits)
    assert a.arrive("later", 0.3) is False
    assert a.due(0.05 + HELD_FACTOR * 0.1 + 0.001) == ([], ["new"])
    assert not a.lifo


def test_a_standing_queue_waits_codel_target_and_a_burst_the_deadline() -> None:
    """Once the oldest waiter was older than CODEL_TARGET_S at every admission for a whole
    CODEL_INTERVAL_S (a standing queue: open-loop overload), a request may wait only the
    target; a queue that drains (a burst) keeps the deadline; a quiet spell resets it."""
    a = fixed(1)
    assert a.arrive("x", 0.0) is True
    assert a.arrive("q0", 0.0) is False and a.arrive("q1", 0.0) is False
    step = 1.5 * CODEL_TARGET_S  # one slot, always two waiting, one served per step
    t, i = 0.0, 0
    while not a.standing and i < 100:
        t, i = t + step, i + 1
        a.release(step)
        run, shed = a.due(t)
        assert len(run) == 1 and shed == []
        assert a.arrive(f"n{i}", t) is False
    assert a.standing and i * step <= 2 * CODEL_INTERVAL_S + step
    assert a.max_wait_s(t) == CODEL_TARGET_S
    assert a.max_wait_s(t + 3 * CODEL_INTERVAL_S) == 0.1  # stale: nothing admitted since
    b = fixed(1)  # the same rate, but the queue drains at every admission: never standing
    assert b.arrive("x", 0.0) is True
    for k in range(30):
        assert b.arrive(f"w{k}", 0.01 * k + 0.001) is False
        b.release(0.01)
        run, _ = b.due(0.01 * k + 0.003)  # each waits 2 ms, then the queue is empty
        assert run == [f"w{k}"] and not b.standing


def test_a_hold_needs_busy_connections_and_few_opening_and_ends_when_more_open() -> None:
    """The hold's judgement on the server's counts: idle connections or connections opening
    (more than 10% of the window's admissions, and 8) keep it off; connections opening while
    held end it, and the next waits out a doubling backoff; an empty queue resets it."""
    a = fixed(4)
    hold = Hold(a)
    busy = lambda: (0, 100)  # noqa: E731  (no idle connection of 100 active)
    for _ in range(4):
        a.arrive(object(), 0.0)
    a.arrive("w", 0.0)  # one waits
    for _ in range(20):
        hold.opened(0.0)  # a burst of connections in the first window
    hold.judge(0.1, busy)
    assert not a.held  # they were opening
    hold.judge(0.2, lambda: (30, 100))
    assert not a.held  # 30% of them idle: the clients could send more
    hold.judge(0.3, busy)
    assert a.held
    for _ in range(9):
        hold.opened(0.35)
    assert not a.held and hold.not_before == 1.35  # 9 > 8 opened: open loop; back off 1 s
    hold.judge(0.4, busy)
    assert not a.held
    hold.judge(1.4, busy)
    assert a.held
    for _ in range(9):
        hold.opened(1.45)
    assert hold.not_before == 1.45 + 2.0  # doubled
    a.release(0.01)
    assert a.due(1.5) == ([], ["w"])  # not held: past its 100 ms
    hold.judge(1.6, busy)  # (a shed in the window: still an overload)
    hold.judge(1.7, busy)  # no queue and nothing shed: over
    assert a.arrive("x", 1.7) is True and a.arrive("y", 1.7) is False
    hold.judge(3.5, busy)
    hold.judge(3.6, busy)
    assert a.held
    for _ in range(9):
        hold.opened(3.65)
    assert hold.not_before == 3.65 + 1.0  # the empty queue reset the backoff


def test_no_connection_open_ends_the_hold_and_its_backoff() -> None:
    """When the last connection closes (the server's heartbeat stops, so no window is judged)
    the load is over: a closed loop that follows an open loop is held at its first saturated
    window, not after the open loop's backoff."""
    a = fixed(1)
    hold = Hold(a)
    a.arrive("x", 0.0)
    a.arrive("w", 0.0)
    hold.judge(0.1, lambda: (0, 10))
    assert a.held
    for _ in range(9):
        hold.opened(0.15)  # open loop after all
    assert not a.held and hold.not_before == 1.15
    for _ in range(9):
        hold.opened(0.16)
    hold.idle()  # every connection closed
    hold.judge(0.3, lambda: (0, 10))  # a new, closed-loop load: quiet since the idle
    assert a.held
    for _ in range(9):
        hold.opened(0.35)
    assert hold.not_before == 0.35 + 1.0  # the backoff started afresh


def test_a_misjudged_hold_gives_back_the_limit_it_replaced() -> None:
    """A hold ended by connections opening (open loop after all) restores the limit from
    before it at once; a hold that ends because the clients have room again decays from where
    it grew to as the lag says."""
    a = Admission(limit=AdaptiveLimit(ceiling=512, adaptive=True), deadline_s=0.1)
    hold = Hold(a)
    run_windows(a.limit, 3, lag_s=10 * LAG_TARGET_S, inflight=None, held=False)
    assert a.limit.limit == MIN_LIMIT
    for _ in range(MIN_LIMIT + 1):
        a.arrive(object(), 0.0)  # the last one waits
    hold.judge(0.1, lambda: (0, 100))
    a.limit.window(held=a.held)
    assert a.held and a.limit.limit == MIN_LIMIT * HOLD_GROWTH  # growing to the ceiling
    for _ in range(9):
        hold.opened(0.15)  # 9 > 8 opened: open loop
    assert not a.held and a.limit.limit == MIN_LIMIT
    a.limit.window(held=True)  # a true hold, ended by idle connections: no restore
    a.limit.window(held=False)
    a.limit.misjudged()
    assert a.limit.limit == MIN_LIMIT * HOLD_GROWTH  # (no lag in that window: it stays)


def test_a_hold_ends_when_more_requests_wait_than_its_connections_can_send() -> None:
    """Held clients send one request per connection: the hold's room is the connections
    active when it began (plus CHURN_MIN, plus any opened since). One more request outstanding
    than that means connections we counted idle are sending (an open-loop pool that opens
    none): the hold ends and the limit goes back."""
    a = Admission(limit=AdaptiveLimit(ceiling=512, adaptive=True), deadline_s=0.1)
    hold = Hold(a)
    run_windows(a.limit, 3, lag_s=10 * LAG_TARGET_S, inflight=None, held=False)
    for _ in range(MIN_LIMIT + 10):
        a.arrive(object(), 0.0)
    hold.judge(0.1, lambda: (0, 100))  # 100 connections active, none idle
    a.limit.window(held=a.held)
    assert a.held and hold.room == 100 + CHURN_MIN
    hold.opened(0.11)  # one more connection: room for one more request
    assert hold.room == 100 + CHURN_MIN + 1
    while a.inflight + a.waiting < hold.room:
        a.arrive(object(), 0.12)
    hold.check(0.12)
    assert a.held  # as many outstanding as the connections can send: still a closed loop
    a.arrive(object(), 0.13)
    hold.check(0.13)
    assert not a.held and a.limit.limit == MIN_LIMIT and hold.not_before == 0.13 + 1.0
