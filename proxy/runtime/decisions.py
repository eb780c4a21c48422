"""Rollout decisions from the supervisor to its workers, through shared memory (`workers = N`).

One controller decides each canary, the supervisor's, on the pooled counts; each worker's
controller of the same rollout `follow`s it. The supervisor `publish`es every canary's
(rollout key, weight, status) every scheduler interval into a one-row segment per model; each
worker `follow`s what it reads on its own interval, once the rollout key matches its own (a
worker still on an older config ignores a decision about a rollout it does not serve). A
decision so reaches every worker within two intervals (0.5 s); a restarted worker starts from
the state file the supervisor wrote, then follows.
"""

from __future__ import annotations

import hashlib

from proxy.engine.shared import SharedCounts
from proxy.routing.rollout import RolloutStatus
from proxy.runtime.rollouts import Rollouts

COLUMNS = 4  # sequence (odd while being written, 0 before any), rollout key hash, weight, status
WEIGHT_SCALE = 1_000_000  # weights travel as integer millionths of a percent
STATUSES = list(RolloutStatus)


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


def _tag(model: str) -> str:
    return "d-" + hashlib.blake2b(model.encode(), digest_size=10).hexdigest()


class SharedDecisions:
    """The group's rollout decisions (`group`: the supervisor's pid)."""

    def __init__(self, group: int) -> None:
        self.group = group
        self._segments: dict[str, SharedCounts] = {}

    def _row(self, model: str) -> SharedCounts:
        seg = self._segments.get(model)
        if seg is None:
            seg = SharedCounts.open(self.group, _tag(model), slots=1, columns=COLUMNS)
            self._segments[model] = seg
        return seg

    def publish(self, rollouts: Rollouts) -> None:
        """The supervisor's side: every canary's decision as it stands."""
        for model, c in rollouts.controllers().items():
            row = self._row(model).row(0)
            decision = (_key_hash(c.key), round(c.weight * WEIGHT_SCALE), STATUSES.index(c.status))
            if tuple(row[1:]) == decision:
                continue
            # a sequence lock: odd while written, so a reader never takes half a decision
            row[0] += 1
            row[1:] = decision
            row[0] += 1

    def follow(self, rollouts: Rollouts) -> None:
        """A worker's side: take each decision whose rollout this worker serves."""
        for model, c in rollouts.controllers().items():
            row = self._row(model).row(0)
            before = int(row[0])
            key, weight, status = (int(x) for x in row[1:])
            if before == 0 or before % 2 or int(row[0]) != before:
                continue  # nothing published yet, or being written: the next interval takes it
            if key == _key_hash(c.key) and 0 <= status < len(STATUSES):
                c.follow(weight / WEIGHT_SCALE, STATUSES[status])

    def close(self) -> None:
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()
