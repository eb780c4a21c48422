"""Every counter the planes read, behind methods: per-version request statistics and the
process's own counts (shed, fallbacks, reloads, non-finite inputs, feedback). Handlers call
methods, never write attributes: this is the one object a multi-process server backs with
shared memory."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import numpy as np

from proxy.config.schema import VersionKey
from proxy.engine.stats import STATS_COLUMNS, VersionStats


class FeedbackOutcome(StrEnum):
    """What became of one feedback call."""

    JOINED = "joined"  # the truth joined its stored prediction
    UNKNOWN_ID = "unknown_id"  # no stored prediction has that id


class Refusal(StrEnum):
    """Why the data plane closed a connection without serving its request (label values)."""

    HEADER_TIMEOUT = "header_timeout"  # headers started, not finished in limits.header_timeout_s
    BODY_TIMEOUT = "body_timeout"  # a body stalled past limits.body_timeout_s: 408
    TOO_MANY_CONNECTIONS = "too_many_connections"  # past limits.max_connections: 503
    MALFORMED_HTTP = "malformed_http"  # bytes that do not parse as HTTP/1.1: 400
    CLIENT_DISCONNECTED = "client_disconnected"  # the client left before its answer


class ReloadOutcome(StrEnum):
    OK = "ok"
    ERROR = "error"


# Vector layouts for publishing into shared memory (engine/pool.py): one vector for the
# process's own counts, one per version (its statistics, then its fallbacks) and one per model.
PROCESS_COLUMNS = 1 + len(ReloadOutcome) + len(Refusal)  # shed, reloads, refusals
VERSION_COLUMNS = STATS_COLUMNS + 1
MODEL_COLUMNS = 1 + len(FeedbackOutcome)  # non-finite inputs, feedback by outcome
Vector = np.ndarray[Any, Any]


class Counters:
    """Counts that outlive plans: a reload keeps every version's statistics."""

    def __init__(self) -> None:
        self._versions: dict[VersionKey, VersionStats] = {}
        self._shed = 0
        self._fallbacks: dict[VersionKey, int] = {}
        self._reloads = dict.fromkeys(ReloadOutcome, 0)
        self._nonfinite: dict[str, int] = {}
        self._feedback: dict[tuple[str, FeedbackOutcome], int] = {}
        self._refused = dict.fromkeys(Refusal, 0)

    # ---------------------------------------------------------------- writers

    def version(self, key: VersionKey) -> VersionStats:
        """The statistics of one version (made on first use; the plan hands them to its parts)."""
        st = self._versions.get(key)
        if st is None:
            st = self._versions[key] = VersionStats()
        return st

    def shed(self) -> None:
        """A request was refused before any work (the in-flight limit)."""
        self._shed += 1

    def fallback(self, failed: VersionKey) -> None:
        """`failed` could not answer; the stable version answered instead."""
        self._fallbacks[failed] = self._fallbacks.get(failed, 0) + 1

    def reload(self, outcome: ReloadOutcome) -> None:
        self._reloads[outcome] += 1

    def nonfinite(self, model: str) -> None:
        """A request to `model` carried NaN, infinity or an out-of-range value."""
        self._nonfinite[model] = self._nonfinite.get(model, 0) + 1

    def feedback(self, model: str, outcome: FeedbackOutcome) -> None:
        key = (model, outcome)
        self._feedback[key] = self._feedback.get(key, 0) + 1

    def refused(self, why: Refusal) -> None:
        """A connection was answered and closed (or left) without its request served."""
        self._refused[why] += 1

    # ---------------------------------------------------------------- readers

    def requests_total(self) -> int:
        """Requests every version has started, ever."""
        return sum(st.requests for st in self._versions.values())

    def version_keys(self) -> list[VersionKey]:
        """Every version counted so far (a reload keeps those it dropped)."""
        return list(self._versions)

    def refused_counts(self) -> dict[Refusal, int]:
        return dict(self._refused)

    @property
    def shed_total(self) -> int:
        return self._shed

    def fallbacks_of(self, key: VersionKey) -> int:
        return self._fallbacks.get(key, 0)

    def reloads(self) -> dict[str, int]:
        return {str(k): v for k, v in self._reloads.items()}

    def nonfinite_counts(self) -> dict[str, int]:
        return dict(self._nonfinite)

    def feedback_counts(self) -> dict[tuple[str, FeedbackOutcome], int]:
        return dict(self._feedback)

    # ---------------------------------------------------------------- vectors

    def write_process(self, out: Vector) -> None:
        """The process's own counts into PROCESS_COLUMNS int64s."""
        out[:] = (self._shed, *self._reloads.values(), *self._refused.values())

    def read_process(self, v: Vector, *, reloads: bool = True) -> None:
        """Take the process's counts from a vector `write_process` wrote, or a sum of them;
        without `reloads`, this process's own reload counts stay (the supervisor's)."""
        n = len(ReloadOutcome)
        self._shed = int(v[0])
        if reloads:
            self._reloads = {k: int(x) for k, x in zip(ReloadOutcome, v[1 : 1 + n], strict=True)}
        self._refused = {
            k: int(x) for k, x in zip(Refusal, v[1 + n : PROCESS_COLUMNS], strict=True)
        }

    def write_version(self, key: VersionKey, out: Vector) -> None:
        """One version's statistics and fallbacks into VERSION_COLUMNS int64s."""
        self.version(key).write(out[:STATS_COLUMNS])
        out[STATS_COLUMNS] = self._fallbacks.get(key, 0)

    def read_version(self, key: VersionKey, v: Vector) -> None:
        self.version(key).read(v[:STATS_COLUMNS])
        self._fallbacks[key] = int(v[STATS_COLUMNS])

    def write_model(self, model: str, out: Vector) -> None:
        """One model's non-finite inputs and feedback outcomes into MODEL_COLUMNS int64s."""
        out[0] = self._nonfinite.get(model, 0)
        out[1:] = [self._feedback.get((model, o), 0) for o in FeedbackOutcome]

    def read_model(self, model: str, v: Vector) -> None:
        _put(self._nonfinite, model, int(v[0]))
        for o, n in zip(FeedbackOutcome, v[1:MODEL_COLUMNS], strict=True):
            _put(self._feedback, (model, o), int(n))


def _put(counts: dict[Any, int], key: Any, n: int) -> None:
    """Set a sparse count: a key is present only while its count is not 0."""
    if n:
        counts[key] = n
    else:
        counts.pop(key, None)
