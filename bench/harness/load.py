"""Load drivers: wrk (closed loop) and bench/openloop.py (a fixed rate), each pinned to a core."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from harness.servers import BENCH, INFER_PATH, ROOT

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
SUBPROCESS_GRACE_S = 60  # beyond the run's own length, before a driver counts as hung


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """requests/s, latency percentiles (ms), non-2xx and socket errors from `wrk --latency`."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if rps is None:
        raise ValueError(f"no Requests/sec in wrk's output:\n{text}")
    out: dict[str, Any] = {"rps": float(rps.group(1))}
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M)
        if m is None:
            raise ValueError(f"no {pct}% latency in wrk's output (was --latency given?):\n{text}")
        out[f"p{pct}_ms"] = round(_ms(m.group(1), m.group(2)), 4)
    total = re.search(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text, re.M)
    out["requests"] = int(total.group(1)) if total else None
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(g) for g in sock.groups()) if sock else 0
    return out


def run_wrk(
    url: str, lua: Path, *, conns: int, duration: int, cpu: int, timeout_s: float = 5.0
) -> dict[str, Any]:
    """`wrk --latency -t1 -c<conns>` for `duration` s on `cpu`, parsed (see parse_wrk)."""
    cmd = ["taskset", "-c", str(cpu), "wrk", "--latency", "-t1", f"-c{conns}", f"-d{duration}s"]
    cmd += [f"--timeout={timeout_s:g}s", "-s", str(lua), url]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=duration + SUBPROCESS_GRACE_S,
        check=False,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr}\n{proc.stdout}")
    return parse_wrk(proc.stdout)


def run_open_loop(
    port: int, bodies_file: Path, *, rate: float, duration: int, warmup: float, cpu: int
) -> dict[str, Any]:
    """bench/openloop.py at `rate` req/s for warmup + duration s on `cpu`: its JSON answer."""
    cmd = ["taskset", "-c", str(cpu), sys.executable, str(BENCH / "openloop.py")]
    cmd += ["--port", str(port), "--path", INFER_PATH, "--bodies", str(bodies_file)]
    cmd += ["--rate", f"{rate:.1f}", "--duration", str(duration), "--warmup", f"{warmup:g}"]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        timeout=duration + warmup + SUBPROCESS_GRACE_S,
        check=False,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"openloop.py failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}"
        )
    result: dict[str, Any] = orjson.loads(proc.stdout)
    return result
