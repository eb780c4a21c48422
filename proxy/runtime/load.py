"""How busy the serving loop is: its lag and CPU share, and whether mirrors must yield."""

from __future__ import annotations

import logging

from proxy.engine.mirror import BUSY_KEEP_EVERY
from proxy.runtime.plan import Plan

log = logging.getLogger("mlproxy")
# Mirrors yield (see MirrorLane.busy) once the loop thread used this share of a CPU over one
# measuring interval, and mirror fully again once it is back under BUSY_LEAVE.
BUSY_ENTER = 0.85
BUSY_LEAVE = 0.7


class LoopLoad:
    """The last measurement of the event loop, and the mirror-yield hysteresis it drives."""

    def __init__(self) -> None:
        self._lag_s = 0.0
        self._busy = 0.0
        self._mirrors_yield = False

    @property
    def lag_s(self) -> float:
        """How late the last timer fired: time the loop was too busy to get to it."""
        return self._lag_s

    @property
    def busy(self) -> float:
        """The serving loop thread's CPU share over the last interval."""
        return self._busy

    @property
    def mirrors_yield(self) -> bool:
        return self._mirrors_yield

    def lag(self, lag_s: float) -> None:
        self._lag_s = max(lag_s, 0.0)

    def measure(self, share: float, plan: Plan) -> None:
        """Take the loop's CPU share (thread CPU time / wall time over the last interval); the
        plan's mirror lanes yield while it is high (entered at BUSY_ENTER, left under
        BUSY_LEAVE)."""
        self._busy = share
        busy = share >= BUSY_ENTER or (self._mirrors_yield and share >= BUSY_LEAVE)
        if busy != self._mirrors_yield:
            self._mirrors_yield = busy
            log.info(
                "serving loop at %.0f%% of a CPU: mirrors %s",
                share * 100,
                f"take 1 request in {BUSY_KEEP_EVERY}" if busy else "take every request again",
            )
        for mp in plan.models.values():
            for lane in mp.lanes.values():
                lane.busy = busy
