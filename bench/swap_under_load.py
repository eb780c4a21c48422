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
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from harness.floors import Check
from harness.payloads import cancer_rows, infer_bodies
from harness.report import md_table, write_json
from harness.servers import INFER_PATH, MODELS, ROOT, STATUS_PATH, ServerSpec, running
from harness.transcript import Transcript

CONNS = 64
N_ROWS = 64  # distinct breast-cancer rows the users cycle through
SWITCH_DEADLINE_S = 2.0


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
    bodies = infer_bodies(cancer_rows(N_ROWS, dtype="float32"))
    plan = edits(port, admin, args.edits)
    book = Book()
    url = f"http://127.0.0.1:{port}{INFER_PATH}"
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
        async with http.get(f"http://127.0.0.1:{admin}{STATUS_PATH}") as resp:
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--edits", type=int, default=30)
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument(
        "--output", type=Path, default=ROOT / "bench" / "results" / "swap_under_load.json"
    )
    return p.parse_args(argv)


def serve_and_drive(args: argparse.Namespace, tmp: Path, t: Transcript) -> dict[str, Any]:
    """Start the proxy on a blue-green config in `tmp`, then load it while editing the config."""
    path = tmp / "config.toml"

    def cmd(port: int, admin: int, _tmp: Path) -> list[str]:
        path.write_text(config_text(port, admin, blue_green("blue")))
        return [sys.executable, "-m", "proxy", "serve", "--config", str(path)]

    spec = ServerSpec("mlproxy", "mlproxy", cmd)
    probe = infer_bodies(cancer_rows(1, dtype="float32"))[0]
    with running(spec, tmp=tmp, cpu=args.server_cpu, probe_body=probe, transcript=t) as server:
        os.sched_setaffinity(0, {args.load_cpu})
        return asyncio.run(drive(args, path, server.port, server.admin_port))


def checks(
    non_200: int,
    statuses: dict[int, int],
    book: Book,
    switches: list[dict[str, Any]],
    result: dict[str, Any],
) -> list[Check]:
    reloads = result["status"]["config"]["reloads"]
    worst = max((s["settled_s"] for s in switches), default=0.0)
    valid = len(result["edits"]) - 1
    errors = f"connection errors: {book.connection_errors} (must be 0) {book.error_samples}"
    return [
        Check(f"non-200 answers: {non_200} (must be 0) {statuses}", non_200 == 0, ""),
        Check(errors, book.connection_errors == 0, ""),
        Check(
            f"every switch settled within {SWITCH_DEADLINE_S} s (slowest {worst:.3f} s)",
            all(s["settled"] for s in switches),
            "",
        ),
        Check(
            f"the one invalid edit was refused (refused reloads: {reloads['error']})",
            reloads["error"] == 1,
            "",
        ),
        Check(
            f"reloads applied: {reloads['ok']} of {valid} valid edits",
            reloads["ok"] >= valid - 2,
            "",
        ),
    ]


def report(t: Transcript, result: dict[str, Any]) -> tuple[dict[str, Any], list[Check]]:
    """Print the figures, the per-edit table and the checks; the JSON document."""
    book: Book = result["book"]
    statuses: dict[int, int] = {}
    for a in book.answers:
        statuses[a[2]] = statuses.get(a[2], 0) + 1
    non_200 = sum(n for s, n in statuses.items() if s != 200)
    switches = switch_times(book, result["edits"])
    reloads = result["status"]["config"]["reloads"]
    sent = len(book.answers) + book.connection_errors
    worst = max((s["settled_s"] for s in switches), default=0.0)
    t.out(
        f"mlproxy config swaps under load: {CONNS} connections, {result['elapsed']:.1f} s,"
        f" {len(result['edits'])} edits"
    )
    t.out()
    rows = [
        ["requests sent", f"{sent:,}"],
        ["requests/s", f"{sent / result['elapsed']:,.0f}"],
        ["non-200 answers", str(non_200)],
        ["connection errors", str(book.connection_errors)],
        ["reloads ok / refused", f"{reloads['ok']} / {reloads['error']}"],
        ["slowest switch to the new version", f"{worst:.3f} s"],
    ]
    t.out(md_table(["figure", "value"], ["---", "--:"], rows))
    t.out()
    per_edit = [
        [s["edit"], str(s["expect"]), f"{s['answers_after']:,}", f"{s['settled_s']:.3f} s"]
        for s in switches
    ]
    header = ["edit", "must answer", "answers after", "all from it after"]
    t.out(md_table(header, ["---", "---", "--:", "--:"], per_edit))
    verdicts = checks(non_200, statuses, book, switches, result)
    t.out()
    for c in verdicts:
        t.out(c.line())
    doc = {
        "requests": sent,
        "statuses": {str(k): v for k, v in statuses.items()},
        "connection_errors": book.connection_errors,
        "reloads": reloads,
        "switches": switches,
        "elapsed_s": result["elapsed"],
        "edits": [e.label for _, e in result["edits"]],
    }
    return doc, verdicts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (MODELS / "v1" / "manifest.json").exists():
        print("run `mlproxy demo-models` first", file=sys.stderr)
        return 2
    t = Transcript()
    with tempfile.TemporaryDirectory(prefix="swap-") as tmp:
        try:
            result = serve_and_drive(args, Path(tmp), t)
        except RuntimeError as exc:  # the server did not come up: its log is in the message
            print(exc, file=sys.stderr)
            return 2
    doc, verdicts = report(t, result)
    write_json(args.output, doc)
    t.save(args.output.with_suffix(".md"))
    return 0 if all(c.ok for c in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
