"""RSS over a million requests (issue 11): flat after warm-up, growth under 10%.

One mlproxy (`single` by default, every monitor on: drift histograms and windows, the
prediction store, latency histograms; `--mode shadow` adds the mirror and its comparisons) on
CPU 0; wrk -c64 on CPU 1 in segments of `--segment` seconds until `--requests` have been
answered. After each segment: the server's RSS (/proc) and how many requests it has answered.
Growth is the last sample's RSS over the first sample's at or past `--warmup` requests, which
lets the first allocations settle (arenas, the prediction store's ring filling, numpy's
caches). A long-lived leak of even 100 bytes a request shows: 100 MB over 1M requests.

Floors: growth < 10%; every answer 2xx. Bounded: at most `--max-segments` segments.

Run from the repository root (needs wrk, taskset, two cores, and ``mlproxy demo-models``):

    .venv/bin/python bench/soak.py --out bench/results/soak-run1   # ~3 min at 6k req/s
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness.configs import mlproxy_config
from harness.load import run_wrk
from harness.payloads import cancer_rows, infer_bodies, write_lua
from harness.proc import cpu_seconds, rss_mb
from harness.report import save_run
from harness.servers import INFER_PATH, ServerSpec, running
from harness.transcript import Transcript

SERVER_CPU = 0
LOAD_CPU = 1
CONNS = 64
GROWTH_MAX = 0.10


def spec(mode: str) -> ServerSpec:
    def cmd(port: int, admin: int, tmp: Path) -> list[str]:
        path = tmp / f"soak-{mode}.toml"
        path.write_text(mlproxy_config(mode, port, admin, monitoring=True))
        return [sys.executable, "-m", "proxy", "serve", "--config", str(path)]

    return ServerSpec(mode, "mlproxy", cmd)


def growth(samples: list[dict[str, Any]], warmup: int) -> tuple[float | None, dict[str, Any]]:
    """(RSS growth from the first sample at or past `warmup` requests to the last, that first
    sample); None when no sample is past the warm-up or it is the last."""
    after = [s for s in samples if s["requests"] >= warmup]
    if len(after) < 2 or after[0]["rss_mb"] <= 0:
        return None, after[0] if after else {}
    return after[-1]["rss_mb"] / after[0]["rss_mb"] - 1.0, after[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="single", choices=("single", "shadow", "canary"))
    p.add_argument("--requests", type=int, default=1_000_000)
    p.add_argument("--warmup", type=int, default=100_000, help="requests before the reference")
    p.add_argument("--segment", type=int, default=10, help="seconds of wrk between samples")
    p.add_argument("--max-segments", type=int, default=120)
    p.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = p.parse_args(argv)
    t = Transcript()
    bodies = infer_bodies(cancer_rows(256))
    samples: list[dict[str, Any]] = []
    non_2xx = errors = 0
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lua = tmp / "soak.lua"
        write_lua(lua, bodies)
        with running(
            spec(args.mode), tmp=tmp, cpu=SERVER_CPU, probe_body=bodies[0], transcript=t
        ) as server:
            pid = server.proc.pid
            answered = 0
            samples.append({"requests": 0, "rss_mb": rss_mb(pid), "cpu_s": cpu_seconds(pid)})
            for _ in range(args.max_segments):
                if answered >= args.requests:
                    break
                r = run_wrk(
                    server.base + INFER_PATH, lua, conns=CONNS, duration=args.segment, cpu=LOAD_CPU
                )
                answered += r["requests"] or 0
                non_2xx += r["non_2xx"]
                errors += r["socket_errors"]
                sample = {
                    "requests": answered,
                    "rss_mb": rss_mb(pid),
                    "cpu_s": round(cpu_seconds(pid), 2),
                    "rps": r.get("rps"),
                }
                samples.append(sample)
                t.log(f"{answered:>9} requests  RSS {sample['rss_mb']} MB  ({r.get('rps')} req/s)")
    grew, reference = growth(samples, args.warmup)
    done = samples[-1]["requests"]
    t.out(f"## soak: {args.mode}, {done:,} requests, wrk -c{CONNS}")
    t.out()
    t.out("| requests | RSS MB | server CPU s |")
    t.out("|---|---|---|")
    for s in samples:
        t.out(f"| {s['requests']:,} | {s['rss_mb']} | {s['cpu_s']} |")
    t.out()
    t.out("| floor | value | bound | verdict |")
    t.out("|---|---|---|---|")
    enough = done >= args.requests
    if grew is None:
        t.out(
            f"| RSS growth after {args.warmup:,} requests | n/a | < {GROWTH_MAX} | FAIL (no sample) |"
        )
    else:
        verdict = "PASS" if grew < GROWTH_MAX and enough else "FAIL"
        note = "" if enough else f" (only {done:,} of {args.requests:,} requests)"
        t.out(
            f"| RSS growth from {reference['requests']:,} requests ({reference['rss_mb']} MB) to"
            f" {done:,} ({samples[-1]['rss_mb']} MB) | {grew:.3f} | < {GROWTH_MAX} |"
            f" {verdict}{note} |"
        )
    clean = non_2xx == 0 and errors == 0
    t.out(
        f"| answers not 2xx, socket errors | {non_2xx}, {errors} | 0 |"
        f" {'PASS' if clean else 'FAIL'} |"
    )
    passed = grew is not None and grew < GROWTH_MAX and enough and clean
    if args.out:
        result = {
            "mode": args.mode,
            "requests": done,
            "warmup": args.warmup,
            "growth": grew,
            "non_2xx": non_2xx,
            "socket_errors": errors,
            "samples": samples,
            "passed": passed,
        }
        save_run(args.out, result, t)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
