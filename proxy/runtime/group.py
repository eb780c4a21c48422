"""Who serves: this process alone, or a supervisor's workers (DESIGN section 7, `workers`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

Members = Callable[[], list[dict[str, Any]]]


class Group:
    """The `workers` list of /admin/status: one entry per live serving process (pid, config
    digest, start, restarts, requests served). A single process lists itself; a supervisor
    `follow`s its workers."""

    def __init__(self, digest: Callable[[], str], requests: Callable[[], int]) -> None:
        self._digest = digest
        self._requests = requests
        self._started_at = time.time()
        self._source: Members | None = None

    def follow(self, source: Members) -> None:
        """List what `source` says instead of this process (the supervisor's workers)."""
        self._source = source

    def members(self) -> list[dict[str, Any]]:
        if self._source is not None:
            return self._source()
        return [
            {
                "pid": os.getpid(),
                "digest": self._digest(),
                "started_at": round(self._started_at, 3),
                "restarts": 0,
                "requests": self._requests(),
            }
        ]
