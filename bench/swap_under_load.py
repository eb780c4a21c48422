"""Config swaps under load: 64 connections for 30 s while config.toml is rewritten 30 times.

The proxy (``python -m proxy serve``, pinned to CPU 0) serves models.cancer; this script (pinned
to CPU 1) keeps 64 keep-alive connections busy with real breast-cancer rows and, once a second,
rewrites the config file the way an operator's editor does (write a temp file, rename it over
config.toml), so the proxy's file watcher picks each edit up:

* blue-green flips (active blue <-> green),
* canary weight changes (70/30, 30/70),
* a version added (v3) and removed again,
* a switch to single mode on either version,
* one invalid edit (an unknown key), which must be refused while the old config keeps serving.

It prints requests sent, non-200 answers and connection errors (both must be 0), and for every
edit after which exactly one version must answer, how long it took until every request that
started later was answered by that version (must be <= 2 s). Results go to
bench/results/swap_under_load.json.

Run from the repository root (needs ``mlproxy demo-models``):

    .venv/bin/python bench/swap_under_load.py              # 30 s, 30 edits
    .venv/bin/python bench/swap_under_load.py --duration 10 --edits 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from sklearn.datasets import load_breast_cancer

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models" / "cancer"
CONNS = 64
SWITCH_DEADLINE_S = 2.0
READY_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Edit:
    """One rewrite of the config: its label, its text, and who alone must answer after it."""

    label: str
    text: str
    expect: str | None  # None: a mix of versions (canary) is expected


def config_text(port: int, admin: int, body: str, versions: tuple[str, ...] = ("v1", "v2")) -> str:
    paths = {"v1": MODELS / "v1", "v2": MODELS / "v2", "v3": MODELS / "v2"}  # v3: v2's files again
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        "[admin]",
        'host = "127.0.0.1"',
        f"port = {admin}",
        "[limits]",
        "max_inflight = 4096",
        "queue_timeout_ms = 1000",
        "[models.cancer]",
        body,
        "[models.cancer.versions]",
        *(f'{v} = {{ path = "{paths[v]}" }}' for v in versions),
    ]
    return "\n".join(lines) + "\n"


def blue_green(active: str) -> str:
    return (
        f'mode = "blue_green"\nstable = "v1"\n[models.cancer.blue_green]\n'
        f'blue = "v1"\ngreen = "v2"\nactive = "{active}"'
    )


def edits(port: int, admin: int, n: int) -> list[Edit]:
    bg = blue_green

    def canary(w1: int, w2: int, extra: str = "") -> str:
        return (
            f'mode = "canary"\nstable = "v1"\nsticky_key = "x-user-id"\n'
            f"[models.cancer.canary]\nweights = {{ v1 = {w1}, v2 = {w2}{extra} }}"
        )

    cycle = [
        Edit("blue-green -> green", config_text(port, admin, bg("green")), "v2"),
        Edit("blue-green -> blue", config_text(port, admin, bg("blue")), "v1"),
        Edit("canary 70/30", config_text(port, admin, canary(70, 30)), None),
        Edit(
            "add v3, canary 30/50/20",
            config_text(port, admin, canary(30, 50, ", v3 = 20"), ("v1", "v2", "v3")),
            None,
        ),
        Edit(
            "remove v3, single v1", config_text(port, admin, 'mode = "single"\nstable = "v1"'), "v1"
        ),
        Edit("single v2", config_text(port, admin, 'mode = "single"\nstable = "v2"'), "v2"),
    ]
    out = [cycle[i % len(cycle)] for i in range(n)]
    bad = n // 2 + 1 if n > 2 else n - 1
    prev = out[bad - 1]
    out[bad] = Edit(
        "invalid edit (unknown key), refused",
        prev.text.replace("[limits]", "[limits]\nmax_inflite = 10"),
        prev.expect,
    )
    return out


@dataclass
class Book:
    """Every answer: (start, end, status, version); connection errors counted apart."""

    answers: list[tuple[float, float, int, str]] = field(default_factory=list)
    connection_errors: int = 0
    error_samples: list[str] = field(default_factory=list)


async def user(
    http: aiohttp.ClientSession,
    url: str,
    bodies: list[bytes],
    uid: int,
    deadline: float,
    book: Book,
) -> None:
    i = uid
    headers = {"Content-Type": "application/json", "x-user-id": f"user-{uid}"}
    while time.monotonic() < deadline:
        body = bodies[i % len(bodies)]
        i += 1
        start = time.monotonic()
        try:
            async with http.post(url, data=body, headers=headers) as resp:
                await resp.read()
                book.answers.append(
                    (start, time.monotonic(), resp.status, resp.headers.get("x-model-version", ""))
                )
        except (aiohttp.ClientError, OSError) as exc:
            book.connection_errors += 1
            if len(book.error_samples) < 5:
                book.error_samples.append(repr(exc))


def write_like_an_editor(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".swp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def drive(args: argparse.Namespace, path: Path, port: int, admin: int) -> dict[str, Any]:
    rows = load_breast_cancer().data.astype("float32")
    bodies = [
        orjson.dumps(
            {
                "inputs": [
                    {"name": "input", "shape": [1, 30], "datatype": "FP32", "data": r.tolist()}
                ]
            }
        )
        for r in rows[:64]
    ]
    plan = edits(port, admin, args.edits)
    book = Book()
    url = f"http://127.0.0.1:{port}/v2/models/cancer/infer"
    t0 = time.monotonic()
    deadline = t0 + args.duration
    done_edits: list[tuple[float, Edit]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNS)) as http:
        users = [
            asyncio.ensure_future(user(http, url, bodies, u, deadline, book)) for u in range(CONNS)
        ]
        interval = args.duration / (args.edits + 1)
        for k, edit in enumerate(plan):
            await asyncio.sleep(
                max(0.0, t0 + (k + 1) * interval - time.monotonic())
            )  # the edit schedule
            write_like_an_editor(path, edit.text)
            done_edits.append((time.monotonic(), edit))
        await asyncio.gather(*users)
        async with http.get(f"http://127.0.0.1:{admin}/admin/status") as resp:
            status = await resp.json()
    return {"book": book, "edits": done_edits, "status": status, "elapsed": time.monotonic() - t0}


def switch_times(book: Book, edits_done: list[tuple[float, Edit]]) -> list[dict[str, Any]]:
    """For each edit with one expected version: time until every later-started answer came from it."""
    out = []
    answers = sorted(book.answers)
    for k, (t, edit) in enumerate(edits_done):
        if edit.expect is None:
            continue
        end = edits_done[k + 1][0] if k + 1 < len(edits_done) else float("inf")
        window = [a for a in answers if t <= a[0] < end]
        wrong = [a for a in window if a[3] != edit.expect]
        settled = (max(a[0] for a in wrong) - t) if wrong else 0.0
        out.append(
            {
                "edit": edit.label,
                "expect": edit.expect,
                "answers_after": len(window),
                "settled_s": round(settled, 3),
                "settled": bool(window)
                and settled <= SWITCH_DEADLINE_S
                and (not wrong or max(a[0] for a in wrong) < end),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--edits", type=int, default=30)
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument(
        "--output", type=Path, default=ROOT / "bench" / "results" / "swap_under_load.json"
    )
    args = p.parse_args(argv)
    if not (MODELS / "v1" / "manifest.json").exists():
        print("run `mlproxy demo-models` first", file=sys.stderr)
        return 2
    port, admin = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp(prefix="swap-"))
    path = tmp / "config.toml"
    path.write_text(config_text(port, admin, blue_green("blue")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            "taskset",
            "-c",
            str(args.server_cpu),
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(path),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/v2/health/ready", timeout=1
                ) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print((tmp / "server.log").read_text(), file=sys.stderr)
                return 2
            time.sleep(0.05)  # readiness poll with a deadline
        os.sched_setaffinity(0, {args.load_cpu})
        result = asyncio.run(drive(args, path, port, admin))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    book: Book = result["book"]
    statuses: dict[int, int] = {}
    for a in book.answers:
        statuses[a[2]] = statuses.get(a[2], 0) + 1
    non_200 = sum(n for s, n in statuses.items() if s != 200)
    switches = switch_times(book, result["edits"])
    reloads = result["status"]["config"]["reloads"]
    sent = len(book.answers) + book.connection_errors
    print(
        f"mlproxy config swaps under load: {CONNS} connections, {result['elapsed']:.1f} s, {len(result['edits'])} edits"
    )
    print()
    print("| figure | value |")
    print("|---|--:|")
    print(f"| requests sent | {sent:,} |")
    print(f"| requests/s | {sent / result['elapsed']:,.0f} |")
    print(f"| non-200 answers | {non_200} |")
    print(f"| connection errors | {book.connection_errors} |")
    print(f"| reloads ok / refused | {reloads['ok']} / {reloads['error']} |")
    worst = max((s["settled_s"] for s in switches), default=0.0)
    print(f"| slowest switch to the new version | {worst:.3f} s |")
    print()
    print("| edit | must answer | answers after | all from it after |")
    print("|---|---|--:|--:|")
    for s in switches:
        print(f"| {s['edit']} | {s['expect']} | {s['answers_after']:,} | {s['settled_s']:.3f} s |")
    checks = [
        (non_200 == 0, f"non-200 answers: {non_200} (must be 0) {statuses}"),
        (
            book.connection_errors == 0,
            f"connection errors: {book.connection_errors} (must be 0) {book.error_samples}",
        ),
        (
            all(s["settled"] for s in switches),
            f"every switch settled within {SWITCH_DEADLINE_S} s (slowest {worst:.3f} s)",
        ),
        (
            reloads["error"] == 1,
            f"the one invalid edit was refused (refused reloads: {reloads['error']})",
        ),
        (
            reloads["ok"] >= len(result["edits"]) - 1 - 2,
            f"reloads applied: {reloads['ok']} of {len(result['edits']) - 1} valid edits",
        ),
    ]
    print()
    for ok, text in checks:
        print(f"- {'PASS' if ok else 'FAIL'} {text}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(
        orjson.dumps(
            {
                "requests": sent,
                "statuses": {str(k): v for k, v in statuses.items()},
                "connection_errors": book.connection_errors,
                "reloads": reloads,
                "switches": switches,
                "elapsed_s": result["elapsed"],
                "edits": [e.label for _, e in result["edits"]],
            },
            option=orjson.OPT_INDENT_2,
        )
    )
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
