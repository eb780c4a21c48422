"""LogThrottle: repeated events logged at most once per interval, with their count."""

from __future__ import annotations

import pytest

from proxy.engine.throttle import LogThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_the_first_event_is_logged_at_once_then_one_per_interval_with_the_count() -> None:
    clock = Clock()
    t = LogThrottle(10.0, clock)
    assert t.hit("a") == 1  # the first one: at once
    hits = []
    for _ in range(99):
        clock.now += 0.05  # 99 more within the next 4.95 s: counted, not logged
        hits.append(t.hit("a"))
    assert hits == [None] * 99 and t.pending() == {"a": 99}
    clock.now = 60.0  # the interval is over: the next one carries everything since
    assert t.hit("a") == 100
    assert t.pending() == {}
    clock.now += 9.999
    assert t.hit("a") is None
    clock.now += 0.001
    assert t.hit("a") == 2


def test_keys_are_throttled_apart() -> None:
    clock = Clock()
    t = LogThrottle(1.0, clock)
    assert t.hit(("cancer", "v2")) == 1
    assert t.hit(("cancer", "v3")) == 1  # another key is not held back by the first
    assert t.hit(("cancer", "v2")) is None
    assert t.pending() == {("cancer", "v2"): 1}


def test_a_quiet_key_logs_its_next_event_at_once() -> None:
    clock = Clock()
    t = LogThrottle(5.0, clock)
    assert t.hit("shed") == 1
    clock.now += 3600.0
    assert t.hit("shed") == 1


def test_zero_interval_logs_every_event_and_a_negative_one_is_refused() -> None:
    t = LogThrottle(0.0, Clock())
    assert [t.hit("x") for _ in range(3)] == [1, 1, 1]
    with pytest.raises(ValueError, match="interval_s must be >= 0"):
        LogThrottle(-1.0, Clock())
