"""The plan in force and the requests in flight on it."""

from __future__ import annotations

import asyncio

from proxy.runtime.plan import Plan


class Current:
    """Holds the one reference a reload swaps. A request takes the plan in force when it starts
    (`enter`) and finishes on it (`leave`), whatever a reload does in between."""

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False

    @property
    def plan(self) -> Plan:
        return self._plan

    @property
    def inflight(self) -> int:
        """Requests started and not finished, on any plan."""
        return self._inflight

    @property
    def draining(self) -> bool:
        """True once the process is stopping: no request after the ones in flight."""
        return self._draining

    def drain(self) -> None:
        self._draining = True

    def enter(self) -> Plan:
        plan = self._plan
        self._inflight += 1
        self._idle.clear()
        plan.enter()
        return plan

    def leave(self, plan: Plan) -> None:
        plan.leave()
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    def swap(self, plan: Plan) -> Plan:
        """Put `plan` in force; returns the one it replaced (still serving its own requests)."""
        old, self._plan = self._plan, plan
        return old

    async def drained(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
