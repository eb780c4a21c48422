"""Overload A/B: two code trees side by side, the same loads interleaved, medians of the reps.

This machine's speed moves up to 3x within minutes, so two `bench/overload.py` runs one after
the other compare two machines as much as two policies (most runs drift past 15%). Here both
servers (REF's code in a git worktree, and this checkout's) run at once, pinned to core 0 (the
idle one costs nothing), and every load runs on one, then at once on the other, rep after rep:
what drifts, drifts for both. Each open-loop rate is a share of the two servers' mean wrk -c64
capacity, so both get the same offered load.

It judges no floor (that is `bench/overload.py`'s job); it prints, per load and server, the
median over the reps of goodput / C, 503 share, admitted p99 (open loop) or p99 (closed loop)
and the generator's connections, with every rep's row. Loads: a factor for open loop (``2``)
or ``c`` and a connection count for wrk (``c1000``).

Run: ``.venv/bin/python bench/overload_ab.py --ref main --reps 3 0.7 2 c1000``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
from overload import LOAD_CPU, SERVER_CPU, closed_loop, open_loop, run_wrk, spec

from harness.payloads import cancer_rows, infer_bodies, write_bodies, write_lua
from harness.servers import INFER_PATH, ROOT, running
from harness.transcript import Transcript
from harness.worktree import baseline_worktree


def one(server: Any, load: str, cap: float, paths: tuple[Path, Path], args: Any) -> dict[str, Any]:
    """One load on one server: the figures the summary compares."""
    lua, bodies = paths
    if load.startswith("c"):
        r = closed_loop(server, lua, int(load[1:]), args)
        total = max(r["requests"] or 1, 1)
        return {
            "goodput": round(r["goodput_rps"] / cap, 3),
            "shed_share": round(r["shed"] / total, 4),
            "p99_ms": r["p99_ms"],
            "conns": int(load[1:]),
            "health_max_ms": r["health_max_ms"],
        }
    r = open_loop(server, bodies, float(load) * cap, args)
    return {
        "goodput": round(r["goodput_rps"] / cap, 3),
        "shed_share": round(r["shed"] / max(r["measured"], 1), 4),
        "p99_ms": r["admitted_p99_ms"],
        "conns": r["max_connections"],
        "health_max_ms": r["health_max_ms"],
        "sustained": r["sustained"],
    }


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("loads", nargs="+", help="open-loop factors (2) and wrk connections (c1000)")
    p.add_argument("--ref", required=True, help="the git ref to compare this checkout with")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration", type=int, default=6, help="measured seconds per load")
    p.add_argument("--max-conns", type=int, default=6000, help="open-loop connections at most")
    p.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = p.parse_args(argv)
    for load in args.loads:
        if not load.removeprefix("c").replace(".", "", 1).isdigit():
            p.error(f"a load is a factor (2) or c and connections (c1000), not {load!r}")
    t = Transcript()
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="mlproxy-ab-") as tmpdir, contextlib.ExitStack() as st:
        tmp = Path(tmpdir)
        bodies = infer_bodies(cancer_rows(256))
        paths = (tmp / "ab.lua", tmp / "ab-bodies.txt")
        write_lua(paths[0], bodies)
        write_bodies(paths[1], bodies)
        base = st.enter_context(baseline_worktree(args.ref))
        specs = [spec(f"single@{args.ref}", base.path / "config.toml", base.path)]
        specs.append(spec("single", ROOT / "config.toml", ROOT))
        servers = [
            st.enter_context(
                running(s, tmp=tmp, cpu=SERVER_CPU, probe_body=bodies[0], transcript=t)
            )
            for s in specs
        ]
        caps = []
        for s in servers:
            run_wrk(s.base + INFER_PATH, paths[0], conns=64, duration=2, cpu=LOAD_CPU)  # warm-up
            caps.append(closed_loop(s, paths[0], 64, args)["goodput_rps"])
        cap = statistics.mean(caps)
        t.log(f"capacity (wrk -c64): {dict(zip((s.name for s in specs), caps, strict=True))}")
        for rep in range(args.reps):
            for load in args.loads:
                for s in servers:
                    r = one(s, load, cap, paths, args)
                    rows.setdefault(load, {}).setdefault(s.spec.name, []).append(r)
                    t.log(f"rep {rep + 1} {load} {s.spec.name}: {r}")
        after = [closed_loop(s, paths[0], 64, args)["goodput_rps"] for s in servers]
        t.log(f"capacity after (wrk -c64): {after}")
    t.out(f"\n## Medians of {args.reps} interleaved reps (C = {cap:.0f} rps, both servers' mean)\n")
    t.out("| load | server | goodput / C | 503 share | p99 ms (open: admitted) | conns |")
    t.out("|---|---|---|---|---|---|")
    for load, by_server in rows.items():
        for name, rs in by_server.items():
            t.out(
                f"| {load} | {name} | {median(rs, 'goodput')} | {median(rs, 'shed_share')} |"
                f" {median(rs, 'p99_ms')} | {median(rs, 'conns')} |"
            )
    if args.out:
        doc = {"ref": args.ref, "capacity_rps": caps, "capacity_after_rps": after, "rows": rows}
        args.out.with_suffix(".json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        t.save(args.out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
