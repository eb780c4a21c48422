"""What must survive a restart: rollout decisions (state file) and every change served (audit log)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("mlproxy.state")


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that a reader (or a crash) sees the old content or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    with contextlib.suppress(OSError):  # make the rename itself durable where the fs allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class StateFile:
    """Rollout decisions per model, JSON, rewritten whole and atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.models: dict[str, dict[str, Any]] = {}
        self.load_error: str | None = None
        self.write_errors = 0
        try:
            doc = orjson.loads(path.read_bytes())
            if not isinstance(doc, dict) or not isinstance(doc.get("models", {}), dict):
                raise ValueError('not a {"models": {...}} object')
            self.models = doc.get("models", {})
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
            # Never start serving while silently forgetting a rollback: say so loudly.
            self.load_error = (
                f"{path}: cannot be read ({exc}); starting without saved rollout state"
            )
            log.error("%s", self.load_error)

    def get(self, model: str) -> dict[str, Any] | None:
        return self.models.get(model)

    def put(self, model: str, entry: dict[str, Any] | None) -> None:
        if entry is None:
            self.models.pop(model, None)
        else:
            self.models[model] = entry
        self.flush()

    def flush(self) -> None:
        doc = {"format_version": 1, "models": self.models}
        data = orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        try:
            write_atomic(self.path, data)
        except OSError as exc:
            # A read-only directory (a ConfigMap mount) must not stop a rollback from taking
            # effect: it does, in memory; only its survival across a restart is lost, loudly.
            self.write_errors += 1
            log.error(
                "cannot write rollout state %s: %s (the decision holds until restart)",
                self.path,
                exc,
            )


class AuditLog:
    """Append-only JSON lines: one line per change of what is served, with its cause."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self.write_errors = 0

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        entry = {"ts": round(self._clock(), 6), "event": event, **fields}
        line = orjson.dumps(entry, option=orjson.OPT_SORT_KEYS) + b"\n"
        try:
            with self.path.open("ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # serving goes on; the log line keeps the record
            self.write_errors += 1
            log.error(
                "cannot append to audit log %s: %s; entry: %s",
                self.path,
                exc,
                line.decode().strip(),
            )
        return entry

    def read(self) -> list[dict[str, Any]]:
        try:
            return [
                orjson.loads(line) for line in self.path.read_bytes().splitlines() if line.strip()
            ]
        except FileNotFoundError:
            return []
