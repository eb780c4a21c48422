"""Throughput and latency of mlproxy against a bare server and an inline-ONNX baseline.

What is measured (every server on CPU core 0, every load generator on core 1, all on 127.0.0.1):

* ``http-limit``: bench/bare_server.py --mode fixed: aiohttp + uvloop parsing the JSON body into
  numpy and replying a fixed body. The HTTP + JSON ceiling of one core.
* ``inline-onnx``: bench/bare_server.py --mode inline: the same, running
  models/cancer/v1/model.onnx inline per request (onnxruntime, one thread). The baseline.
* ``single``, ``canary``, ``shadow``: ``mlproxy serve`` (run as ``python -m proxy serve`` from
  the repository root, so this checkout's code is measured) with models.cancer in mode
  "single" (v1), "canary" (v1 90 / v2 10) and "shadow" (v1 answers, every request mirrored to
  v2), with [limits] max_inflight = 4096 and the rest of config.toml as it is; all monitoring
  (histograms, drift, duplicates, feedback store) is on, as shipped.
* ``single-nomon``: ``single`` with ``[models.cancer.drift] enabled = false``: what monitoring costs.

Load:

* closed loop, 64 connections: ``wrk --latency -t1 -c64`` with a generated Lua script POSTing real
  breast-cancer rows (8, in turn): requests/s, p50 and p99 for all five servers.
* closed loop, 1 connection (``-t1 -c1``): p50 of inline-onnx and single (the proxy's own
  overhead on an idle server).
* open loop at a fixed rate of half of single's 64-connection requests/s: p50 of single and
  shadow, from bench/openloop.py (wrk cannot send at a fixed rate and Debian has no wrk2).
  Latency counts from each request's scheduled send time, so queueing is not hidden. If the
  generator cannot sustain that rate, the highest rate it sustains is used and labelled so.

The figures are measured in rounds. Each round of the first phase starts all six servers
afresh, warms each up with a discarded wrk run, measures run i of every 64- and 1-connection
figure, and stops them. Within a round the configurations take turns in 1 s slices (``--slice``;
the order rotates every cycle; one first cycle is not counted) until each has had
``--duration`` seconds: a run's req/s is its requests over its slices' time, its p50/p99 the
median of its slices'. The second phase does the
same for the open-loop figures with single and shadow only (1 s slices, each after 0.5 s not
measured), at half of single's median 64-connection throughput over all of phase 1. Every figure
is the median of ``--runs`` runs, and every ratio floor is judged on the median of the per-round
ratios (configurations measured interleaved, on fresh processes). Why: this VM's speed drifts by
10-30% over minutes and moves within seconds, and one process can stay slower than an identical
one for its whole life. Two identical servers measured 6 s one after the other differed by 9.4%
(standard deviation over 6 rounds), and by 4.8% when measured in 1 s slices in turn. The script
prints a markdown table, the floor checks (PASS/FAIL) with every round's ratio, mlproxy's
batching and mirror counters from /admin/status, and writes everything to
bench/results/throughput.json.

Run from the repository root (needs wrk, taskset, two cores, and ``mlproxy demo-models``):

    .venv/bin/python bench/throughput.py                       # 5 rounds x 6 s: about 10 minutes
    .venv/bin/python bench/throughput.py --runs 1 --duration 3 # a quick look
    .venv/bin/python bench/throughput.py --quick               # the same, to throughput-quick.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
MODELS = ROOT / "models" / "cancer"
INFER_PATH = "/v2/models/cancer/infer"
READY_PATH = "/v2/health/ready"
STATUS_PATH = "/admin/status"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
N_ROWS = 8  # distinct breast-cancer rows the load cycles through
CONNS = 64
OPEN_LOOP_FACTORS = (1.0, 0.75, 0.5, 0.35, 0.25)  # of the target rate, tried in turn

# The floors the issue sets.
SINGLE_OVER_INLINE_RPS = 1.3
CANARY_OVER_SINGLE_RPS = 0.9
SHADOW_OVER_SINGLE_RPS = 0.75
SHADOW_OVER_SINGLE_P50 = 1.3
IDLE_OVERHEAD_MS = 0.1
MONITORING_ON_OVER_OFF_RPS = 0.9


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    bar = "!" * 78
    text = f"{bar}\n!!! WARNING: {msg}\n{bar}"
    print(text, file=sys.stderr, flush=True)
    print(text, flush=True)


# --------------------------------------------------------------------------- request bodies


def request_bodies(n: int) -> list[bytes]:
    """Open Inference Protocol bodies of one real breast-cancer row each."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer().data
    bodies = []
    for row in data[:n]:
        doc = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, len(row)],
                    "datatype": "FP32",
                    "data": [float(v) for v in row],
                }
            ]
        }
        bodies.append(orjson.dumps(doc))
    return bodies


def write_lua(path: Path, bodies: list[bytes]) -> None:
    """A wrk script that POSTs the bodies in turn (requests built once, in init)."""
    items = ",\n".join(f"  [=[{b.decode()}]=]" for b in bodies)
    path.write_text(
        "-- generated by bench/throughput.py: POST one breast-cancer row per request\n"
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"local bodies = {{\n{items}\n}}\n"
        "local requests = {}\n"
        "local i = 0\n"
        "function init(args)\n"
        "  for k, body in ipairs(bodies) do\n"
        "    requests[k] = wrk.format(nil, nil, nil, body)\n"
        "  end\n"
        "end\n"
        "function request()\n"
        "  i = i % #requests + 1\n"
        "  return requests[i]\n"
        "end\n"
    )


# --------------------------------------------------------------------------- config for mlproxy


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else orjson.dumps(key).decode()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def dump_toml(doc: dict[str, Any]) -> str:
    """TOML for the subset config.toml uses: tables, scalars, arrays of scalars."""
    lines: list[str] = []

    def emit(path: list[str], table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        subtables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if path and (scalars or not subtables):
            lines.append(f"\n[{'.'.join(_toml_key(p) for p in path)}]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in subtables.items():
            emit([*path, k], v)

    emit([], doc)
    return "\n".join(lines).lstrip() + "\n"


def mlproxy_config(mode: str, port: int, admin_port: int, *, monitoring: bool = True) -> str:
    """config.toml with models.cancer in `mode`, the given ports and absolute model paths."""
    doc = tomllib.loads((ROOT / "config.toml").read_text())
    doc.setdefault("server", {}).update(host="127.0.0.1", port=port, workers=1)
    doc.setdefault("admin", {}).update(host="127.0.0.1", port=admin_port)
    doc.setdefault("limits", {})["max_inflight"] = 4096
    model = dict(doc.get("models", {}).get("cancer", {}))
    model["mode"] = mode
    model["stable"] = "v1"
    model["versions"] = {v: {"path": str(MODELS / v)} for v in ("v1", "v2")}
    model["canary"] = {"weights": {"v1": 90, "v2": 10}}
    model["shadow"] = {**model.get("shadow", {}), "primary": "v1", "mirrors": ["v2"], "sample": 1.0}
    model["drift"] = {**model.get("drift", {}), "enabled": monitoring}
    doc["models"] = {"cancer": model}
    return dump_toml(doc)


# --------------------------------------------------------------------------- processes


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


@dataclass
class ServerSpec:
    name: str
    kind: str  # "bare" or "mlproxy"
    make_cmd: Callable[[int, int, Path], list[str]]  # (port, admin port, tmp dir) -> argv


@dataclass
class Server:
    spec: ServerSpec
    port: int
    admin_port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def admin_status(self) -> dict[str, Any] | None:
        if self.spec.kind != "mlproxy":
            return None
        try:
            status, body = http("GET", f"http://127.0.0.1:{self.admin_port}{STATUS_PATH}")
        except OSError as exc:
            warn(f"{self.spec.name}: {STATUS_PATH} failed: {exc!r}")
            return None
        if status != 200:
            warn(f"{self.spec.name}: {STATUS_PATH} answered HTTP {status}: {body[:200]!r}")
            return None
        doc: dict[str, Any] = orjson.loads(body)
        return doc


def wait_ready(server: Server, deadline_s: float) -> None:
    """Poll GET /v2/health/ready (and mlproxy's admin port) until 200, exit, or the deadline."""
    urls = [server.base + READY_PATH]
    if server.spec.kind == "mlproxy":
        urls.append(f"http://127.0.0.1:{server.admin_port}{STATUS_PATH}")
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
        time.sleep(0.05)  # poll interval, bounded by the deadline
    if not urls:
        return
    raise RuntimeError(
        f"{server.spec.name} not ready after {deadline_s:.0f} s ({last}); its log:\n"
        f"{server.log_tail()}"
    )


def stop(proc: subprocess.Popen[bytes], name: str) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        warn(f"{name} ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s; killing it")
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def running(spec: ServerSpec, tmp: Path, cpu: int, probe_body: bytes) -> Iterator[Server]:
    """Start a server pinned to `cpu`, wait until it is ready and answers an inference, stop it."""
    port, admin_port = free_port(), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["taskset", "-c", str(cpu), *spec.make_cmd(port, admin_port, tmp)]
    log_path = tmp / f"{spec.name}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=None
        )
    server = Server(spec, port, admin_port, proc, log_path)
    try:
        wait_ready(server, READY_TIMEOUT_S)
        status, body = http("POST", server.base + INFER_PATH, probe_body, timeout=5.0)
        if status != 200 or b'"outputs"' not in body:
            raise RuntimeError(
                f"{spec.name}: a probe inference answered HTTP {status}: {body[:300]!r}"
            )
        yield server
    finally:
        stop(proc, spec.name)
    if proc.returncode not in (0, -signal.SIGTERM):
        warn(f"{spec.name} exited with {proc.returncode}; its log:\n{server.log_tail()}")


# --------------------------------------------------------------------------- load generators

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


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
    url: str, lua: Path, conns: int, duration: int, cpu: int, timeout_s: float = 5.0
) -> dict[str, Any]:
    cmd = [
        "taskset",
        "-c",
        str(cpu),
        "wrk",
        "--latency",
        "-t1",
        f"-c{conns}",
        f"-d{duration}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        str(lua),
        url,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + 60, check=False, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr}\n{proc.stdout}")
    return parse_wrk(proc.stdout)


def run_open_loop(
    port: int, bodies_file: Path, rate: float, duration: int, warmup: float, cpu: int
) -> dict[str, Any]:
    cmd = [
        "taskset",
        "-c",
        str(cpu),
        sys.executable,
        str(BENCH / "openloop.py"),
        "--port",
        str(port),
        "--path",
        INFER_PATH,
        "--bodies",
        str(bodies_file),
        "--rate",
        f"{rate:.1f}",
        "--duration",
        str(duration),
        "--warmup",
        f"{warmup:g}",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, timeout=duration + warmup + 60, check=False, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"openloop.py failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}"
        )
    result: dict[str, Any] = orjson.loads(proc.stdout)
    return result


# --------------------------------------------------------------------------- results


@dataclass
class Figure:
    """One row of the table: runs of one configuration under one kind of load."""

    name: str
    load: str  # "c64", "c1" or "open"
    runs: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        values = [r[key] for r in self.runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    def by_round(self, key: str) -> dict[int, float]:
        return {r["round"]: r[key] for r in self.runs if r.get(key) is not None and "round" in r}

    def total(self, key: str) -> int:
        return sum(int(r.get(key) or 0) for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "load": self.load,
            "rps": self.median("rps" if self.load != "open" else "achieved_rps"),
            "p50_ms": self.median("p50_ms"),
            "p99_ms": self.median("p99_ms"),
            "non_2xx": self.total("non_2xx"),
            "errors": self.total("socket_errors") + self.total("errors"),
            "runs": self.runs,
        }


def batching_summary(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """Per version: batches, mean rows per batch, mirror counters; `after - before` if given."""
    if after is None:
        return {}
    out: dict[str, Any] = {}
    versions_after = after["models"]["cancer"]["versions"]
    versions_before = before["models"]["cancer"]["versions"] if before else {}
    for v, doc in versions_after.items():
        prev = versions_before.get(v, {})
        b = doc.get("batching") or {}
        pb = prev.get("batching") or {}
        batches = (b.get("batches") or 0) - (pb.get("batches") or 0)
        rows = (b.get("batches") or 0) * (b.get("mean_rows") or 0) - (pb.get("batches") or 0) * (
            pb.get("mean_rows") or 0
        )
        mirror = doc.get("mirror") or {}
        pmirror = prev.get("mirror") or {}
        out[v] = {
            "requests": doc["requests"] - prev.get("requests", 0),
            "errors": doc["errors"] - prev.get("errors", 0),
            "batches": batches,
            "mean_rows_per_batch": round(rows / batches, 2) if batches else None,
            "max_rows": b.get("max_rows"),
            "queue_shed": (b.get("shed") or 0) - (pb.get("shed") or 0),
            "mirror_sent": (mirror.get("sent") or 0) - (pmirror.get("sent") or 0),
            "mirror_dropped": (mirror.get("dropped") or 0) - (pmirror.get("dropped") or 0),
            "mirror_yielded": (mirror.get("yielded") or 0) - (pmirror.get("yielded") or 0),
            "mirror_failed": (mirror.get("failed") or 0) - (pmirror.get("failed") or 0),
            "mirror_compared": (mirror.get("compared") or 0) - (pmirror.get("compared") or 0),
            "mirror_agreement": mirror.get("agreement"),
        }
    out["_shed_503"] = after.get("shed", 0) - (before.get("shed", 0) if before else 0)
    return out


def format_summary(name: str, phase: str, summary: dict[str, Any]) -> list[str]:
    lines = []
    for v, s in summary.items():
        if v.startswith("_") or not (s["requests"] or s["batches"] or s["mirror_sent"]):
            continue  # a version this mode does not use
        line = (
            f"- {name} / {v} ({phase}): {s['requests']} requests answered,"
            f" {s['batches']} batches, mean {s['mean_rows_per_batch']} rows/batch"
            f" (max {s['max_rows']}), {s['queue_shed']} shed in queue, {s['errors']} errors"
        )
        if s["mirror_sent"] or s["mirror_dropped"] or s["mirror_yielded"]:
            line += (
                f"; mirror: {s['mirror_sent']} rows sent, {s['mirror_dropped']} dropped,"
                f" {s['mirror_yielded']} yielded to a busy loop,"
                f" {s['mirror_failed']} failed, {s['mirror_compared']} compared,"
                f" agreement {s['mirror_agreement']}"
            )
        lines.append(line)
    lines.append(f"- {name} ({phase}): {summary.get('_shed_503', 0)} requests shed with 503")
    return lines


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def paired_ratio(a: Figure | None, b: Figure | None, key: str) -> tuple[float | None, list[float]]:
    """Median of a/b over the rounds both were measured in (side by side), and each round's a/b."""
    if a is None or b is None:
        return None, []
    x, y = a.by_round(key), b.by_round(key)
    ratios = [x[i] / y[i] for i in sorted(x) if y.get(i)]
    return (statistics.median(ratios) if ratios else None), ratios


def render_table(figures: list[Figure], open_rate: float | None, open_label: str) -> str:
    by = {(f.name, f.load): f for f in figures}
    inline = by.get(("inline-onnx", "c64"))
    single = by.get(("single", "c64"))
    rows = [
        "| configuration | load | req/s | p50 ms | p99 ms | non-2xx | errors | req/s vs inline"
        " | req/s vs single |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for f in figures:
        j = f.to_json()
        if f.load == "open":
            load = f"open loop @ {_fmt(open_rate, 0)} req/s{open_label}"
        else:
            load = f"{f.load[1:]} conn" + ("s" if f.load != "c1" else "")
        vs_inline = vs_single = "-"
        if f.load == "c64":
            r_inline, _ = paired_ratio(f, inline, "rps")
            r_single, _ = paired_ratio(f, single, "rps")
            vs_inline = "-" if r_inline is None else f"{r_inline:.2f}x"
            vs_single = "-" if r_single is None else f"{r_single:.2f}x"
        rows.append(
            f"| {f.name} | {load} | {_fmt(j['rps'], 0)} | {_fmt(j['p50_ms'], 3)}"
            f" | {_fmt(j['p99_ms'], 3)} | {j['non_2xx']} | {j['errors']} | {vs_inline}"
            f" | {vs_single} |"
        )
    return "\n".join(rows)


@dataclass
class Check:
    name: str
    ok: bool | None  # None: could not be measured
    detail: str

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "N/A "}[self.ok]
        return f"- {verdict} {self.name}: {self.detail}"


def floor_checks(figures: list[Figure], open_rate: float | None, open_label: str) -> list[Check]:
    by = {(f.name, f.load): f for f in figures}

    def med(name: str, load: str, key: str) -> float | None:
        f = by.get((name, load))
        return f.median(key) if f else None

    checks = []

    def ratio_check(title: str, a: str, b: str, floor: float) -> None:
        fa, fb = by.get((a, "c64")), by.get((b, "c64"))
        r, each = paired_ratio(fa, fb, "rps")
        x, y = med(a, "c64", "rps"), med(b, "c64", "rps")
        if r is None or x is None or y is None:
            checks.append(Check(title, None, "not measured"))
            return
        rounds = ", ".join(f"{v:.2f}" for v in each)
        checks.append(
            Check(
                title,
                r >= floor,
                f"{a}/{b} side by side: median {r:.2f}x of rounds [{rounds}] (floor {floor:.2f}x);"
                f" medians {x:,.0f} / {y:,.0f} req/s = {x / y:.2f}x",
            )
        )

    ratio_check(
        f"single req/s >= {SINGLE_OVER_INLINE_RPS}x inline-onnx",
        "single",
        "inline-onnx",
        SINGLE_OVER_INLINE_RPS,
    )
    ratio_check(
        f"canary req/s >= {CANARY_OVER_SINGLE_RPS}x single",
        "canary",
        "single",
        CANARY_OVER_SINGLE_RPS,
    )
    ratio_check(
        f"shadow req/s >= {SHADOW_OVER_SINGLE_RPS}x single",
        "shadow",
        "single",
        SHADOW_OVER_SINGLE_RPS,
    )
    ratio_check(
        f"single (all monitoring on) req/s >= {MONITORING_ON_OVER_OFF_RPS}x single-nomon (drift off)",
        "single",
        "single-nomon",
        MONITORING_ON_OVER_OFF_RPS,
    )
    title = f"fixed rate, shadow p50 <= {SHADOW_OVER_SINGLE_P50}x single p50"
    s50, h50 = med("single", "open", "p50_ms"), med("shadow", "open", "p50_ms")
    r50, each50 = paired_ratio(by.get(("shadow", "open")), by.get(("single", "open")), "p50_ms")
    if s50 is None or h50 is None or r50 is None or open_rate is None:
        checks.append(Check(title, None, "not measured"))
    else:
        rounds = ", ".join(f"{v:.2f}" for v in each50)
        checks.append(
            Check(
                title,
                r50 <= SHADOW_OVER_SINGLE_P50,
                f"at {open_rate:,.0f} req/s{open_label}, shadow/single side by side: median"
                f" {r50:.2f}x of rounds [{rounds}] (ceiling {SHADOW_OVER_SINGLE_P50:.2f}x);"
                f" medians {h50:.3f} / {s50:.3f} ms",
            )
        )
    title = f"1 connection, single p50 <= inline-onnx p50 + {IDLE_OVERHEAD_MS} ms"
    s1, i1 = med("single", "c1", "p50_ms"), med("inline-onnx", "c1", "p50_ms")
    if s1 is None or i1 is None:
        checks.append(Check(title, None, "not measured"))
    else:
        checks.append(
            Check(
                title,
                s1 <= i1 + IDLE_OVERHEAD_MS,
                f"single {s1:.3f} ms vs inline-onnx {i1:.3f} ms: +{s1 - i1:.3f} ms"
                f" (ceiling +{IDLE_OVERHEAD_MS:.3f} ms)",
            )
        )
    bad = [(f.name, f.load, f.total("non_2xx")) for f in figures if f.total("non_2xx")]
    errs = [
        (f.name, f.load, f.total("socket_errors") + f.total("errors"))
        for f in figures
        if f.total("socket_errors") + f.total("errors")
    ]
    checks.append(
        Check(
            "no non-2xx answers and no socket errors in measured runs",
            not bad and not errs,
            "none" if not bad and not errs else f"non-2xx: {bad}; errors: {errs}",
        )
    )
    return checks


# --------------------------------------------------------------------------- environment


def environment(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return ""

    def run(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return (p.stdout or p.stderr).strip()

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": run(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(run(["git", "status", "--porcelain", "--", "proxy", "config.toml"])),
        "cpu": cpu,
        "cpus_online": os.cpu_count(),
        "server_cpu": args.server_cpu,
        "load_cpu": args.load_cpu,
        "python": platform.python_version(),
        "aiohttp": pkg("aiohttp"),
        "onnxruntime": pkg("onnxruntime"),
        "numpy": pkg("numpy"),
        "orjson": pkg("orjson"),
        "uvloop": pkg("uvloop"),
        "wrk": (run(["wrk", "-v"]).splitlines() or [""])[0],
    }


# --------------------------------------------------------------------------- main


def server_specs() -> list[ServerSpec]:
    py = sys.executable
    # `python -m proxy` (from the repository root) is the `mlproxy` command, run from this
    # checkout's proxy/ whatever the state of the venv's install of it.
    mlproxy = [py, "-m", "proxy"]
    onnx = str(MODELS / "v1" / "model.onnx")

    def bare(mode: str) -> Callable[[int, int, Path], list[str]]:
        def cmd(port: int, _admin: int, _tmp: Path) -> list[str]:
            args = [py, str(BENCH / "bare_server.py"), "--port", str(port), "--mode", mode]
            return [*args, "--model", onnx]

        return cmd

    def proxy(mode: str, monitoring: bool = True) -> Callable[[int, int, Path], list[str]]:
        def cmd(port: int, admin: int, tmp: Path) -> list[str]:
            path = tmp / f"config-{mode}-{'mon' if monitoring else 'nomon'}.toml"
            path.write_text(mlproxy_config(mode, port, admin, monitoring=monitoring))
            return [*mlproxy, "serve", "--config", str(path)]

        return cmd

    return [
        ServerSpec("http-limit", "bare", bare("fixed")),
        ServerSpec("inline-onnx", "bare", bare("inline")),
        ServerSpec("single", "mlproxy", proxy("single")),
        # the same with drift monitoring off ([models.cancer.drift] enabled = false)
        ServerSpec("single-nomon", "mlproxy", proxy("single", monitoring=False)),
        ServerSpec("canary", "mlproxy", proxy("canary")),
        ServerSpec("shadow", "mlproxy", proxy("shadow")),
    ]


def preflight(args: argparse.Namespace) -> None:
    problems = []
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not installed (apt-get install wrk util-linux)")
    allowed = os.sched_getaffinity(0)
    for cpu in (args.server_cpu, args.load_cpu):
        if cpu not in allowed:
            problems.append(f"CPU {cpu} is not available (this process may use {sorted(allowed)})")
    if args.server_cpu == args.load_cpu:
        problems.append("--server-cpu and --load-cpu must differ")
    for v in ("v1", "v2"):
        if not (MODELS / v / "model.onnx").is_file():
            problems.append(f"{MODELS / v} has no model: run `.venv/bin/mlproxy demo-models`")
    if not (ROOT / "proxy" / "__main__.py").is_file():
        problems.append(f"{ROOT / 'proxy'} is not the mlproxy package")
    if problems:
        sys.exit("bench/throughput.py cannot run:\n  " + "\n  ".join(problems))


def rotated(names: list[str], i: int) -> list[str]:
    """Round i's order: each configuration takes each place in turn, so none always runs first."""
    k = i % len(names)
    return names[k:] + names[:k]


def wrk_slice(
    servers: dict[str, Server], lua: Path, conns: int, args: argparse.Namespace, name: str
) -> dict[str, Any]:
    return run_wrk(servers[name].base + INFER_PATH, lua, conns, args.slice, args.load_cpu)


def open_slice(
    servers: dict[str, Server], bodies: Path, rate: float, args: argparse.Namespace, name: str
) -> dict[str, Any]:
    return run_open_loop(
        servers[name].port, bodies, rate, args.open_slice, args.open_warmup, args.load_cpu
    )


def merge_slices(slices: list[dict[str, Any]]) -> dict[str, Any]:
    """One run from the slices of one configuration in one round (wrk's or openloop.py's):
    throughput over their summed time, latency percentiles as the median of the slices'
    (a slice holds thousands of requests; its tail is its own), counts summed."""
    first = slices[0]
    out: dict[str, Any] = {"slices": len(slices)}
    if "achieved_rps" in first:  # openloop.py
        seconds = sum(float(r["duration_s"]) for r in slices)
        out["target_rps"] = first["target_rps"]
        out["achieved_rps"] = round(sum(int(r["measured"]) for r in slices) / seconds, 1)
        out["sustained"] = all(r["sustained"] for r in slices)
        for key in ("dispatch_lag_p50_ms", "dispatch_lag_p99_ms"):
            values = [r[key] for r in slices if r.get(key) is not None]
            out[key] = max(values) if values else None
        counts: tuple[str, ...] = ("non_2xx", "errors", "measured")
        out["slice_p50_ms"] = [r["p50_ms"] for r in slices]
    else:  # wrk: rps is requests over the run's own time
        seconds = sum(r["requests"] / r["rps"] for r in slices if r["rps"] and r["requests"])
        requests = sum(r["requests"] or 0 for r in slices)
        out["rps"] = round(requests / seconds, 2) if seconds else 0.0
        out["slice_rps"] = [r["rps"] for r in slices]
        counts = ("non_2xx", "socket_errors", "requests")
    for key in ("p50_ms", "p75_ms", "p90_ms", "p99_ms"):
        values = [r[key] for r in slices if r.get(key) is not None]
        out[key] = round(statistics.median(values), 4) if values else None
    for key in counts:
        out[key] = sum(int(r.get(key) or 0) for r in slices)
    return out


def interleaved(
    names: list[str],
    measure_one: Callable[[str], dict[str, Any]],
    duration: int,
    slice_s: int,
    first: int,
) -> dict[str, dict[str, Any]]:
    """`duration` seconds per configuration, in slices of `slice_s` taken in turn, the order
    rotated every cycle; merged per configuration (see merge_slices).

    Why: this VM's speed moves within seconds. Two identical servers measured 6 s one after the
    other differed by 9.4% (standard deviation of 6 rounds); the same two measured in 1 s slices
    taken in turn over the same 12 s, by 4.8%. A slow spell now lands on every configuration
    alike instead of on whichever ran then. One cycle more than needed runs first and is not
    counted: after waiting for the other servers' warm-ups, a server's first slice ran 8-25%
    below its next ones.
    """
    cycles = max(1, duration // slice_s)
    slices: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for c in range(cycles + 1):
        for name in rotated(names, first + c):
            r = measure_one(name)
            if c > 0:  # the first cycle is not counted: it ran 8-25% slow in a quick run
                slices[name].append(r)
    return {n: merge_slices(runs) for n, runs in slices.items()}


def merge_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum per-round batching summaries (counters add up; means and maxima are recomputed)."""
    out: dict[str, Any] = {}
    for part in parts:
        for v, s in part.items():
            if v.startswith("_"):
                out[v] = out.get(v, 0) + s
                continue
            acc = out.setdefault(v, {k: 0 for k in s} | {"_rows": 0.0})
            for k, value in s.items():
                if k in ("mean_rows_per_batch", "mirror_agreement"):
                    continue
                if k == "max_rows":
                    acc[k] = max(acc[k] or 0, value or 0)
                else:
                    acc[k] += value or 0
            acc["_rows"] += (s["batches"] or 0) * (s["mean_rows_per_batch"] or 0)
            acc["mirror_agreement"] = s.get("mirror_agreement")
    for v, acc in out.items():
        if not v.startswith("_"):
            rows = acc.pop("_rows")
            acc["mean_rows_per_batch"] = round(rows / acc["batches"], 2) if acc["batches"] else None
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Rounds of side-by-side runs, each round on freshly started servers (see the module's
    docstring): phase 1 closed loop with all six, phase 2 open loop with single and shadow.

    Why rounds of fresh processes: on this shared VM the speed drifts by 10-30% over minutes, so
    figures measured minutes apart compared the hour, not the code; and one server process can
    stay 10-20% slower than an identical one for its whole life (seen with two processes of the
    same config side by side), so a figure measured on a single process compares that process's
    luck. Side-by-side runs on fresh processes every round, and ratios taken per round, average
    both out. The open-loop rate comes from all of phase 1, not from one round's figure.
    """
    bodies = request_bodies(N_ROWS)
    figures: dict[tuple[str, str], Figure] = {}
    parts: dict[str, dict[str, list[dict[str, Any]]]] = {}
    ends: dict[str, Any] = {}
    open_rate: float | None = None
    open_target: float | None = None
    open_note = ""

    def fig(name: str, load: str) -> Figure:
        return figures.setdefault((name, load), Figure(name, load))

    with tempfile.TemporaryDirectory(prefix="mlproxy-bench-") as tmp_name:
        tmp = Path(tmp_name)
        lua = tmp / "infer.lua"
        write_lua(lua, bodies)
        bodies_file = tmp / "bodies.txt"
        bodies_file.write_bytes(b"\n".join(bodies) + b"\n")

        def start_all(stack: contextlib.ExitStack, names: list[str], i: int) -> dict[str, Server]:
            log(f"== round {i + 1}/{args.runs}: starting {', '.join(names)}")
            specs = {spec.name: spec for spec in server_specs()}
            servers = {
                n: stack.enter_context(running(specs[n], tmp, args.server_cpu, bodies[0]))
                for n in names
            }
            for name, srv in servers.items():
                w = run_wrk(srv.base + INFER_PATH, lua, CONNS, args.warmup, args.load_cpu)
                log(f"   {name} warm-up ({args.warmup} s, discarded): {w['rps']:,.0f} req/s")
                if w["non_2xx"] or w["socket_errors"]:
                    warn(
                        f"{name} warm-up: {w['non_2xx']} non-2xx, {w['socket_errors']} socket errors"
                    )
            return servers

        # Phase 1: closed loop, every configuration side by side, fresh servers every round.
        for i in range(args.runs):
            with contextlib.ExitStack() as stack:
                servers = start_all(stack, [spec.name for spec in server_specs()], i)
                names = list(servers)
                before = {n: servers[n].admin_status() for n in names}
                slicing = f"{args.duration} s each in {args.slice} s slices taken in turn"
                log(f"== round {i + 1}/{args.runs}: {CONNS} connections, {slicing}")
                c64 = interleaved(
                    names,
                    functools.partial(wrk_slice, servers, lua, CONNS, args),
                    args.duration,
                    args.slice,
                    i,
                )
                for name in rotated(names, i):
                    r = {**c64[name], "round": i}
                    fig(name, "c64").runs.append(r)
                    log(
                        f"   {name}: {r['rps']:,.0f} req/s, p50 {r['p50_ms']:.3f} ms,"
                        f" p99 {r['p99_ms']:.3f} ms, non-2xx {r['non_2xx']},"
                        f" socket errors {r['socket_errors']}"
                    )
                after = {n: servers[n].admin_status() for n in names}
                log(f"== round {i + 1}/{args.runs}: 1 connection, {slicing}")
                c1 = interleaved(
                    ["inline-onnx", "single"],
                    functools.partial(wrk_slice, servers, lua, 1, args),
                    args.duration,
                    args.slice,
                    i,
                )
                for name, r in c1.items():
                    fig(name, "c1").runs.append({**r, "round": i})
                    log(
                        f"   {name}: {r['rps']:,.0f} req/s, p50 {r['p50_ms']:.3f} ms,"
                        f" p99 {r['p99_ms']:.3f} ms"
                    )
                for name, srv in servers.items():
                    if srv.spec.kind == "mlproxy":
                        p = parts.setdefault(name, {"c64": [], "open": []})
                        p["c64"].append(batching_summary(before[name], after[name]))
                        ends.setdefault(name, []).append(after[name])
                log(f"== round {i + 1}/{args.runs}: stopping the servers")

        # Phase 2: open loop at half of single's capacity (its median over every round of
        # phase 1), single and shadow side by side, fresh servers every round.
        open_target = (fig("single", "c64").median("rps") or 0.0) / 2
        fixed = ["single", "shadow"]
        for i in range(args.runs):
            with contextlib.ExitStack() as stack:
                servers = start_all(stack, fixed, i)
                if open_rate is None:
                    log(f"== open-loop rate: half of single's median {2 * open_target:,.0f} req/s")
                    open_rate = open_loop_rate(servers["single"], bodies_file, open_target, args)
                    if open_rate < open_target:
                        open_note = (
                            f" (the generator could not sustain the target"
                            f" {open_target:,.0f} req/s = half of single's capacity)"
                        )
                        warn(f"open loop: {open_note.strip(' ()')}; used {open_rate:,.0f} req/s")
                before_open = {n: servers[n].admin_status() for n in fixed}
                log(
                    f"== round {i + 1}/{args.runs}: open loop @ {open_rate:,.0f} req/s,"
                    f" {args.duration} s each in {args.open_slice} s slices taken in turn"
                    f" (each after {args.open_warmup:g} s not measured)"
                )
                opened = interleaved(
                    fixed,
                    functools.partial(open_slice, servers, bodies_file, open_rate, args),
                    args.duration,
                    args.open_slice,
                    i,
                )
                for name, r in opened.items():
                    fig(name, "open").runs.append({**r, "round": i})
                    log_open(name, r)
                for name in fixed:
                    end = servers[name].admin_status()
                    parts[name]["open"].append(batching_summary(before_open[name], end))
                log(f"== round {i + 1}/{args.runs}: stopping the servers")
    diagnostics = {
        name: {
            "c64": merge_summaries(p["c64"]),
            "open": merge_summaries(p["open"]),
            "status_after_64_conns_per_round": ends[name],
        }
        for name, p in parts.items()
    }
    order = [
        ("http-limit", "c64"),
        ("inline-onnx", "c64"),
        ("single", "c64"),
        ("single-nomon", "c64"),
        ("canary", "c64"),
        ("shadow", "c64"),
        ("inline-onnx", "c1"),
        ("single", "c1"),
        ("single", "open"),
        ("shadow", "open"),
    ]
    ordered = [figures[k] for k in order if k in figures]
    return {
        "figures": ordered,
        "diagnostics": diagnostics,
        "open_rate": open_rate,
        "open_target": open_target,
        "open_note": open_note,
    }


def log_open(name: str, r: dict[str, Any]) -> None:
    log(
        f"   {name} @ {r['target_rps']:,.0f} req/s: {r['achieved_rps']:,.0f} req/s answered,"
        f" p50 {_fmt(r['p50_ms'], 3)} ms, p99 {_fmt(r['p99_ms'], 3)} ms, non-2xx {r['non_2xx']},"
        f" errors {r['errors']}, generator lag p50/p99 {r['dispatch_lag_p50_ms']}/"
        f"{r['dispatch_lag_p99_ms']} ms, sustained {r['sustained']}"
    )


def open_loop_rate(
    srv: Server, bodies_file: Path, target: float, args: argparse.Namespace
) -> float:
    """`target` req/s, or the highest of OPEN_LOOP_FACTORS * target the generator keeps up with
    (a calibration run against `srv`, not counted)."""
    rate = target
    for factor in OPEN_LOOP_FACTORS:
        rate = target * factor
        r = run_open_loop(
            srv.port, bodies_file, rate, args.duration, args.open_warmup, args.load_cpu
        )
        log_open(f"{srv.spec.name} (calibration)", r)
        if r["sustained"]:
            return rate
        log(f"   the generator fell behind at {rate:,.0f} req/s; trying a lower rate")
    warn(f"the open-loop generator fell behind even at {rate:,.0f} req/s; using it anyway")
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=int, default=None, help="seconds per run (default 6)")
    p.add_argument(
        "--runs", type=int, default=None, help="runs (rounds) per figure, median (default 5)"
    )
    p.add_argument("--warmup", type=int, default=None, help="discarded wrk seconds (default 2)")
    p.add_argument(
        "--slice", type=int, default=1, help="wrk seconds per slice, configurations in turn"
    )
    p.add_argument(
        "--open-slice", type=int, default=1, help="open-loop seconds per slice (default 1)"
    )
    p.add_argument(
        "--open-warmup", type=float, default=0.5, help="open-loop seconds not measured, per slice"
    )
    p.add_argument("--quick", action="store_true", help="--runs 1 --duration 3 --warmup 1")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--output", type=Path, default=None, help="JSON results file")
    p.add_argument("--strict", action="store_true", help="exit 1 when a floor check fails")
    args = p.parse_args(argv)
    quick = {"duration": 3, "runs": 1, "warmup": 1}
    full = {"duration": 6, "runs": 5, "warmup": 2}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.duration < 1 or args.runs < 1 or args.warmup < 1:
        p.error("--duration, --runs and --warmup must be >= 1")
    if not 1 <= args.slice <= args.duration or not 1 <= args.open_slice <= args.duration:
        p.error("--slice and --open-slice must be between 1 and --duration")
    if args.output is None:
        name = "throughput-quick.json" if args.quick else "throughput.json"
        args.output = BENCH / "results" / name
    preflight(args)

    env = environment(args)
    log(
        f"mlproxy throughput: {args.runs} run(s) x {args.duration} s per figure, servers on CPU"
        f" {args.server_cpu}, load on CPU {args.load_cpu}"
    )
    m = measure(args)
    figures: list[Figure] = m["figures"]
    open_rate, open_note = m["open_rate"], m["open_note"]
    checks = floor_checks(figures, open_rate, open_note)

    print()
    print(
        f"## mlproxy throughput ({args.runs} run(s) x {args.duration} s, medians;"
        f" servers pinned to CPU {args.server_cpu}, load to CPU {args.load_cpu})"
    )
    print()
    print(render_table(figures, open_rate, " *" if open_note else ""))
    if open_note:
        print(f"\n\\* open loop{open_note}")
    print("\n### Floor checks\n")
    for c in checks:
        print(c.line())
    print("\n### mlproxy counters (/admin/status, during the 64-connection runs)\n")
    for name, d in m["diagnostics"].items():
        for line in format_summary(name, "64-conn runs", d["c64"]):
            print(line)
    open_phase = {k: d["open"] for k, d in m["diagnostics"].items() if d.get("open")}
    if open_phase:
        print("\n### mlproxy counters (/admin/status, during the open-loop runs)\n")
        for name, summary in open_phase.items():
            for line in format_summary(name, "open-loop runs", summary):
                print(line)
    for f in figures:
        if f.total("non_2xx") or f.total("socket_errors") or f.total("errors"):
            warn(
                f"{f.name} ({f.load}): {f.total('non_2xx')} non-2xx answers,"
                f" {f.total('socket_errors') + f.total('errors')} errors: the figures are suspect"
            )

    doc = {
        "environment": env,
        "params": {
            "duration_s": args.duration,
            "runs": args.runs,
            "warmup_s": args.warmup,
            "open_warmup_s": args.open_warmup,
            "slice_s": args.slice,
            "open_slice_s": args.open_slice,
            "connections": CONNS,
            "rows_cycled": N_ROWS,
            "quick": args.quick,
        },
        "figures": [f.to_json() for f in figures],
        "open_loop": {
            "target_rps": m["open_target"],
            "rate_rps": open_rate,
            "note": open_note.strip(" ()"),
        },
        "checks": [{"name": c.name, "pass": c.ok, "detail": c.detail} for c in checks],
        "diagnostics": m["diagnostics"],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    print(
        f"\nwrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}"
    )
    failed = [c for c in checks if c.ok is False]
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
