"""What must survive a restart: rollout decisions (state file) and every change served (audit log).

Both are written by one background thread, in the order they were asked for, so that an fsync
never stalls the event loop; `wait_written()` waits for what is queued (tests, shutdown)."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("mlproxy.state")


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that a reader (or a crash) sees the old content or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError:
        with contextlib.suppress(OSError):  # leave no stray temp file beside the real one
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the fs allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


Job = Callable[[], None]


class Writer:
    """One daemon thread runs write jobs in submission order."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._pending = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="state-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            self._pending += 1
        self._jobs.put(job)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a job logs its own OSError; anything else must not kill writes
                log.exception("state writer job failed")
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def wait_written(self, timeout: float = 10.0) -> bool:
        """Block until every job submitted so far has run; False if `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        self._jobs.put(None)
        self._thread.join(timeout=10.0)


class StateFile:
    """Rollout decisions per model, JSON, rewritten whole and atomically on every change (by
    the writer thread: the decision holds in memory at once, on disk a moment later)."""

    def __init__(self, path: Path, writer: Writer, *, read_only: bool = False) -> None:
        self.path = path
        self._writer = writer
        self._read_only = read_only  # a worker's: the supervisor alone writes decisions
        self.models: dict[str, dict[str, Any]] = {}
        self.load_error: str | None = None
        self.write_errors = 0  # failed writes, ever
        self.write_error: str | None = None  # why the last write failed; None once one lands
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
        if self._read_only:
            return
        doc = {"format_version": 1, "models": self.models}
        data = orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        self._writer.submit(lambda: self._write(data))

    def _write(self, data: bytes) -> None:
        try:
            write_atomic(self.path, data)
        except OSError as exc:
            # A read-only directory (a ConfigMap mount) must not stop a rollback from taking
            # effect: it does, in memory; only its survival across a restart is lost, loudly,
            # once: every write carries the whole state, so the next one that lands repairs it.
            self.write_errors += 1
            if self.write_error is None:
                log.error(
                    "cannot write rollout state %s: %s (decisions hold in memory until restart;"
                    " logged once, until a write succeeds)",
                    self.path,
                    exc,
                )
            self.write_error = f"{self.path}: {exc.strerror or exc}"
            return
        if self.write_error is not None:
            log.warning("rollout state %s written again", self.path)
            self.write_error = None


class AuditLog:
    """Append-only JSON lines: one line per change of what is served, with its cause.

    A crash (or a full disk) can leave a torn last line; the next append after it starts on a
    line of its own, and `read` skips lines that are not whole JSON."""

    def __init__(
        self,
        path: Path,
        writer: Writer,
        clock: Callable[[], float] = time.time,
        *,
        fields: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self._fields = fields or {}  # on every entry: a worker's `{"worker": slot}`
        self._writer = writer
        self._clock = clock
        self.write_errors = 0  # entries not written, ever
        self.write_error: str | None = None  # why the last append failed; None once one lands
        self._tail_whole = False  # unknown until an append has looked at the file's last byte

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        entry = {"ts": round(self._clock(), 6), "event": event, **self._fields, **fields}
        line = orjson.dumps(entry, option=orjson.OPT_SORT_KEYS) + b"\n"
        self._writer.submit(lambda: self._write(line))
        return entry

    def _write(self, line: bytes) -> None:
        try:
            with self.path.open("a+b") as f:  # readable too: _ends_torn looks at the tail
                if not self._tail_whole and _ends_torn(f.fileno()):
                    line = b"\n" + line  # never glue an entry onto a torn one
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            # Serving goes on. The failure is logged once, not per entry; each entry the file
            # did not take is still kept, in the log, as one line.
            self.write_errors += 1
            self._tail_whole = False  # a short write may have left half a line
            if self.write_error is None:
                log.error(
                    "cannot append to audit log %s: %s; serving goes on, and until an append"
                    " succeeds every entry goes to this log instead, one line each",
                    self.path,
                    exc,
                )
            self.write_error = f"{self.path}: {exc.strerror or exc}"
            log.info("audit entry not written: %s", line.decode().strip())
            return
        self._tail_whole = True
        if self.write_error is not None:
            log.warning(
                "audit log %s written again (%d entries in all were not)",
                self.path,
                self.write_errors,
            )
            self.write_error = None

    def read(self) -> list[dict[str, Any]]:
        """Every whole entry, once what is queued is written (blocks: for tests and tools)."""
        self._writer.wait_written()
        if not self.path.is_file():  # missing, or a device such as /dev/full: nothing to read
            return []
        return parse_audit(self.path.read_bytes())


def parse_audit(data: bytes) -> list[dict[str, Any]]:
    """The entries of an audit log's bytes, skipping blank lines and any that is not a whole
    JSON object (torn by a crash mid-append)."""
    entries = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _ends_torn(fd: int) -> bool:
    """Whether a regular file's last byte is not a newline (its last line is incomplete)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return False
    return os.pread(fd, 1, st.st_size - 1) != b"\n"
