"""Servers under test: spawned pinned to a core, waited for with a deadline, stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from harness.transcript import Transcript

ROOT = Path(__file__).resolve().parent.parent.parent
BENCH = ROOT / "bench"
MODELS = ROOT / "models" / "cancer"
INFER_PATH = "/v2/models/cancer/infer"
READY_PATH = "/v2/health/ready"
STATUS_PATH = "/admin/status"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.05


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http(
    method: str, url: str, body: bytes | None = None, timeout: float = 2.0
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass(frozen=True)
class ServerSpec:
    """How to start one configuration: its name, kind, command line and working directory."""

    name: str
    kind: str  # "bare" or "mlproxy"
    make_cmd: Callable[[int, int, Path], list[str]]  # (port, admin port, tmp dir) -> argv
    cwd: Path = field(default=ROOT)


@dataclass
class Server:
    """A started server: its ports, its process and its log."""

    spec: ServerSpec
    port: int
    admin_port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    transcript: Transcript

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_base(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def admin_status(self) -> dict[str, Any] | None:
        """mlproxy's /admin/status, or None (with a warning) when it cannot be had."""
        if self.spec.kind != "mlproxy":
            return None
        try:
            status, body = http("GET", self.admin_base + STATUS_PATH)
        except OSError as exc:
            self.transcript.warn(f"{self.spec.name}: {STATUS_PATH} failed: {exc!r}")
            return None
        if status != 200:
            self.transcript.warn(
                f"{self.spec.name}: {STATUS_PATH} answered HTTP {status}: {body[:200]!r}"
            )
            return None
        doc: dict[str, Any] = orjson.loads(body)
        return doc


def wait_ready(server: Server, deadline_s: float) -> None:
    """Poll GET /v2/health/ready (and mlproxy's admin port) until 200, exit, or the deadline."""
    urls = [server.base + READY_PATH]
    if server.spec.kind == "mlproxy":
        urls.append(server.admin_base + STATUS_PATH)
    deadline = time.monotonic() + deadline_s
    last = "no answer yet"
    while urls and time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.spec.name} exited with {server.proc.returncode} before it was ready;"
                f" its log:\n{server.log_tail()}"
            )
        try:
            status, _ = http("GET", urls[0], timeout=1.0)
            if status == 200:
                urls.pop(0)
                continue
            last = f"{urls[0]}: HTTP {status}"
        except OSError as exc:
            last = f"{urls[0]}: {exc!r}"
        time.sleep(POLL_INTERVAL_S)  # poll interval, bounded by the deadline
    if not urls:
        return
    raise RuntimeError(
        f"{server.spec.name} not ready after {deadline_s:.0f} s ({last}); its log:\n"
        f"{server.log_tail()}"
    )


def stop(proc: subprocess.Popen[bytes], name: str, transcript: Transcript) -> None:
    """SIGTERM, then SIGKILL if it is still there after STOP_TIMEOUT_S."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        transcript.warn(f"{name} ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s; killing it")
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


def probe(server: Server, body: bytes) -> None:
    """One inference that must answer 200 with outputs, or the server is not worth measuring."""
    status, answer = http("POST", server.base + INFER_PATH, body, timeout=5.0)
    if status != 200 or b'"outputs"' not in answer:
        raise RuntimeError(
            f"{server.spec.name}: a probe inference answered HTTP {status}: {answer[:300]!r}"
        )


@contextlib.contextmanager
def running(
    spec: ServerSpec, *, tmp: Path, cpu: int, probe_body: bytes, transcript: Transcript
) -> Iterator[Server]:
    """Start a server pinned to `cpu`, wait until it is ready and answers an inference, stop it."""
    port, admin_port = free_port(), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["taskset", "-c", str(cpu), *spec.make_cmd(port, admin_port, tmp)]
    log_path = tmp / f"{spec.name}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=spec.cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=None
        )
    server = Server(spec, port, admin_port, proc, log_path, transcript)
    try:
        wait_ready(server, READY_TIMEOUT_S)
        probe(server, probe_body)
        yield server
    finally:
        stop(proc, spec.name, transcript)
    if proc.returncode not in (0, -signal.SIGTERM):
        transcript.warn(f"{spec.name} exited with {proc.returncode}; its log:\n{server.log_tail()}")
