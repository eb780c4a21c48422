"""Throughput and latency of mlproxy against a bare server and an inline-ONNX baseline.

Configurations (servers on CPU 0, load on CPU 1, all on 127.0.0.1): ``http-limit``,
``inline-onnx`` and ``batched-onnx`` (bench/bare_server.py), and mlproxy's ``single``, ``single-nomon`` (drift
off), ``canary`` and ``shadow``, run as ``python -m proxy serve`` from the repository root.
Loads: wrk at 64 connections and at 1, and bench/openloop.py at a fixed rate of half of
single's 64-connection req/s. Rounds of fresh servers; within a round the configurations take
turns in 1 s slices; floors are judged on the median of the per-round ratios. bench/README.md
says what each figure is, how the rounds and slices work and why.

``--baseline-ref REF`` also serves ``single`` from a git worktree of REF (``single@REF``),
measured in the same rounds and slices, and reports single/single@REF.

Run from the repository root (needs wrk, taskset, two cores, and ``mlproxy demo-models``):

    .venv/bin/python bench/throughput.py                       # 5 rounds x 6 s: about 10 minutes
    .venv/bin/python bench/throughput.py --baseline-ref 788b268  # before/after: about 12 minutes
    .venv/bin/python bench/throughput.py --quick               # 1 x 3 s, to throughput-quick.json
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.configs import mlproxy_config
from harness.figures import Figure
from harness.floors import Floor, Kind, Measure, compare, judge, judge_all
from harness.payloads import cancer_rows, infer_bodies, write_bodies, write_lua
from harness.report import comparison_lines, environment, print_report, write_json
from harness.rounds import CONNS, OpenLoop, Rounds, Settings, closed_round, open_round
from harness.servers import BENCH, MODELS, ROOT, ServerSpec
from harness.transcript import Transcript
from harness.worktree import Baseline, baseline_worktree

N_ROWS = 8  # distinct breast-cancer rows the load cycles through
OPEN_LOOP = ("single", "shadow")  # the configurations of phase 2


def _m(config: str, load: str, key: str) -> Measure:
    return Measure(config=config, load=load, key=key)


def _floor(title: str, num: Measure, den: Measure, bound: float, kind: Kind) -> Floor:
    return Floor(title=title, numerator=num, denominator=den, bound=bound, kind=kind)


AT_LEAST, AT_MOST, EXCESS = Kind.RATIO_AT_LEAST, Kind.RATIO_AT_MOST, Kind.EXCESS_AT_MOST
INLINE64, SINGLE64 = _m("inline-onnx", "c64", "rps"), _m("single", "c64", "rps")
BATCHED64 = _m("batched-onnx", "c64", "rps")

# The floors the issue sets: (name, numerator, denominator, bound, kind), judged by
# harness.floors.judge. A ratio is the median of the per-round ratios (measured side by side).
FLOORS = (
    _floor("single req/s >= {bound}x inline-onnx", SINGLE64, INLINE64, 1.3, AT_LEAST),
    _floor("single req/s >= {bound}x batched-onnx", SINGLE64, BATCHED64, 0.9, AT_LEAST),
    _floor("canary req/s >= {bound}x single", _m("canary", "c64", "rps"), SINGLE64, 0.9, AT_LEAST),
    _floor("shadow req/s >= {bound}x single", _m("shadow", "c64", "rps"), SINGLE64, 0.75, AT_LEAST),
    _floor(
        "single (all monitoring on) req/s >= {bound}x single-nomon (drift off)",
        SINGLE64,
        _m("single-nomon", "c64", "rps"),
        0.9,
        AT_LEAST,
    ),
    _floor(
        "fixed rate, shadow p50 <= {bound}x single p50",
        _m("shadow", "open", "p50_ms"),
        _m("single", "open", "p50_ms"),
        1.3,
        AT_MOST,
    ),
    _floor(
        "1 connection, single p50 <= inline-onnx p50 + {bound} ms",
        _m("single", "c1", "p50_ms"),
        _m("inline-onnx", "c1", "p50_ms"),
        0.05,
        EXCESS,
    ),
)
# Goals: judged and reported like floors, beside them, but they never fail a --strict run.
GOALS = (_floor("goal: single req/s >= {bound}x batched-onnx", SINGLE64, BATCHED64, 1.0, AT_LEAST),)

FIGURE_ORDER = (
    ("http-limit", "c64"),
    ("inline-onnx", "c64"),
    ("batched-onnx", "c64"),
    ("single", "c64"),
    ("single-nomon", "c64"),
    ("canary", "c64"),
    ("shadow", "c64"),
    ("inline-onnx", "c1"),
    ("single", "c1"),
    ("single", "open"),
    ("shadow", "open"),
)


def baseline_measures(label: str) -> list[tuple[Measure, Measure]]:
    """single against single@REF: req/s and p50 at 64 connections, p50 at 1."""
    return [
        (_m("single", "c64", "rps"), _m(label, "c64", "rps")),
        (_m("single", "c64", "p50_ms"), _m(label, "c64", "p50_ms")),
        (_m("single", "c1", "p50_ms"), _m(label, "c1", "p50_ms")),
    ]


def figure_order(baseline: Baseline | None) -> list[tuple[str, str]]:
    order = list(FIGURE_ORDER)
    if baseline is not None:
        order.insert(order.index(("single", "c64")) + 1, (baseline.label, "c64"))
        order.insert(order.index(("single", "c1")) + 1, (baseline.label, "c1"))
    return order


# --------------------------------------------------------------------------- configurations


def _bare(mode: str) -> Callable[[int, int, Path], list[str]]:
    onnx = str(MODELS / "v1" / "model.onnx")

    def cmd(port: int, _admin: int, _tmp: Path) -> list[str]:
        args = [sys.executable, str(BENCH / "bare_server.py"), "--port", str(port)]
        return [*args, "--mode", mode, "--model", onnx]

    return cmd


def _proxy(
    mode: str, *, monitoring: bool = True, tag: str = "", base: Path = ROOT / "config.toml"
) -> Callable[[int, int, Path], list[str]]:
    def cmd(port: int, admin: int, tmp: Path) -> list[str]:
        path = tmp / f"config-{mode}-{'mon' if monitoring else 'nomon'}{tag}.toml"
        path.write_text(mlproxy_config(mode, port, admin, monitoring=monitoring, base=base))
        # `python -m proxy` is the `mlproxy` command, run from the code in the server's cwd
        # (this checkout, or a baseline worktree) whatever the state of the venv's install.
        return [sys.executable, "-m", "proxy", "serve", "--config", str(path)]

    return cmd


def server_specs(baseline: Baseline | None = None) -> list[ServerSpec]:
    specs = [
        ServerSpec("http-limit", "bare", _bare("fixed")),
        ServerSpec("inline-onnx", "bare", _bare("inline")),
        ServerSpec("batched-onnx", "bare", _bare("batched")),
        ServerSpec("single", "mlproxy", _proxy("single")),
        # the same with drift monitoring off ([models.cancer.drift] enabled = false)
        ServerSpec("single-nomon", "mlproxy", _proxy("single", monitoring=False)),
        ServerSpec("canary", "mlproxy", _proxy("canary")),
        ServerSpec("shadow", "mlproxy", _proxy("shadow")),
    ]
    if baseline is not None:
        # that commit's code and its own shipped config.toml, with the same bench changes
        cmd = _proxy("single", tag="-baseline", base=baseline.path / "config.toml")
        specs.insert(4, ServerSpec(baseline.label, "mlproxy", cmd, cwd=baseline.path))
    return specs


# --------------------------------------------------------------------------- measuring


def settings(args: argparse.Namespace) -> Settings:
    return Settings(
        duration=args.duration,
        runs=args.runs,
        warmup=args.warmup,
        slice=args.slice,
        open_slice=args.open_slice,
        open_warmup=args.open_warmup,
        server_cpu=args.server_cpu,
        load_cpu=args.load_cpu,
    )


def measure(rounds: Rounds, baseline: Baseline | None) -> OpenLoop:
    """Phase 1 (closed loop, every configuration), then phase 2 (open loop, OPEN_LOOP) at half
    of single's median 64-connection req/s over all of phase 1; fresh servers every round."""
    c1_names = ["inline-onnx", "single"] + ([baseline.label] if baseline else [])
    for i in range(rounds.settings.runs):
        closed_round(rounds, i, c1_names)
    ol = OpenLoop(target=(rounds.fig("single", "c64").median("rps") or 0.0) / 2)
    for i in range(rounds.settings.runs):
        open_round(rounds, i, list(OPEN_LOOP), ol)
    return ol


# --------------------------------------------------------------------------- reporting


def config_note(baseline: Baseline) -> str:
    """How the baseline's generated single config differs from this checkout's (ports aside)."""
    ours = mlproxy_config("single", 1, 2).splitlines()
    theirs = mlproxy_config("single", 1, 2, base=baseline.path / "config.toml").splitlines()
    diff = list(difflib.unified_diff(theirs, ours, baseline.label, "single", lineterm="", n=0))
    return "the same config" if not diff else "configs differ:\n" + "\n".join(diff)


def params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "duration_s": args.duration,
        "runs": args.runs,
        "warmup_s": args.warmup,
        "open_warmup_s": args.open_warmup,
        "slice_s": args.slice,
        "open_slice_s": args.open_slice,
        "connections": CONNS,
        "rows_cycled": N_ROWS,
        "quick": args.quick,
        "baseline_ref": args.baseline_ref,
    }


def before_after(t: Transcript, baseline: Baseline, figures: list[Figure]) -> dict[str, Any]:
    """single against single@REF, measured side by side: printed, and the JSON block."""
    by = {(f.name, f.load): f for f in figures}
    comps = [c for n, d in baseline_measures(baseline.label) if (c := compare(n, d, by))]
    t.out(f"\n### Before/after: single against {baseline.label} (side by side)\n")
    loads = {"c64": f"{CONNS} connections", "c1": "1 connection"}
    for line in comparison_lines(comps, loads):
        t.out(line)
    return {
        "ref": baseline.ref,
        "commit": baseline.commit,
        "proxy_file": baseline.proxy_file,
        "config": config_note(baseline),
        "comparisons": [c.to_json() for c in comps],
    }


def collect(args: argparse.Namespace, t: Transcript, baseline: Baseline | None) -> Rounds:
    """Measure every round; the Rounds hold the figures and the counters."""
    bodies = infer_bodies(cancer_rows(N_ROWS))
    specs = {s.name: s for s in server_specs(baseline)}
    with tempfile.TemporaryDirectory(prefix="mlproxy-bench-") as tmp_name:
        rounds = Rounds(settings(args), Path(tmp_name), t, specs, bodies)
        write_lua(rounds.lua, bodies)
        write_bodies(rounds.bodies_file, bodies)
        rounds.open_loop = measure(rounds, baseline)
    return rounds


def run(args: argparse.Namespace, t: Transcript, baseline: Baseline | None) -> int:
    env = environment(ROOT, server_cpu=args.server_cpu, load_cpu=args.load_cpu)
    t.log(
        f"mlproxy throughput: {args.runs} run(s) x {args.duration} s per figure, servers on CPU"
        f" {args.server_cpu}, load on CPU {args.load_cpu}"
    )
    if baseline is not None:
        t.log(f"baseline {baseline.label}: commit {baseline.commit}, {baseline.proxy_file}")
        t.log(f"baseline {baseline.label}: {config_note(baseline)}")
    rounds = collect(args, t, baseline)
    ol = rounds.open_loop
    figures = [rounds.figures[k] for k in figure_order(baseline) if k in rounds.figures]
    prefixes = {"open": f"at {ol.rate:,.0f} req/s{ol.note}, "} if ol.rate is not None else {}
    checks = judge_all(FLOORS, figures, prefixes)
    goals = [judge(g, figures, prefixes) for g in GOALS]
    diag = rounds.diagnostics()
    title = (
        f"## mlproxy throughput ({args.runs} run(s) x {args.duration} s, medians;"
        f" servers pinned to CPU {args.server_cpu}, load to CPU {args.load_cpu})"
    )
    print_report(
        t,
        title=title,
        figures=figures,
        checks=[*checks, *goals],
        open_loop=(ol.rate, ol.note),
        diagnostics=diag,
    )
    doc: dict[str, Any] = {
        "environment": env,
        "params": params(args),
        "figures": [f.to_json() for f in figures],
        "open_loop": {"target_rps": ol.target, "rate_rps": ol.rate, "note": ol.note.strip(" ()")},
        "floors": [f.to_json() for f in FLOORS],
        "checks": [c.to_json() for c in checks],
        "goals": [c.to_json() for c in goals],
        "diagnostics": diag,
    }
    if baseline is not None:
        doc["baseline"] = before_after(t, baseline, figures)
    write_json(args.output, doc)
    markdown = args.output.with_suffix(".md")
    for path in (args.output, markdown):
        t.out(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    t.save(markdown)
    return 1 if args.strict and any(c.ok is False for c in checks) else 0


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument
    add("--duration", type=int, default=None, help="seconds per run (default 6)")
    add("--runs", type=int, default=None, help="runs (rounds) per figure, median (default 5)")
    add("--warmup", type=int, default=None, help="discarded wrk seconds (default 2)")
    add("--slice", type=int, default=1, help="wrk seconds per slice, configurations in turn")
    add("--open-slice", type=int, default=1, help="open-loop seconds per slice (default 1)")
    add("--open-warmup", type=float, default=0.5, help="open-loop seconds not measured, per slice")
    add("--quick", action="store_true", help="--runs 1 --duration 3 --warmup 1")
    add("--server-cpu", type=int, default=0)
    add("--load-cpu", type=int, default=1)
    add("--output", type=Path, default=None, help="JSON results file (and .md beside it)")
    add("--strict", action="store_true", help="exit 1 when a floor check fails")
    add("--baseline-ref", default=None, help="also measure single served from this git ref")
    args = p.parse_args(argv)
    defaults = {"duration": 3, "runs": 1, "warmup": 1} if args.quick else {}
    for key, value in {"duration": 6, "runs": 5, "warmup": 2, **defaults}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.duration < 1 or args.runs < 1 or args.warmup < 1:
        p.error("--duration, --runs and --warmup must be >= 1")
    if not 1 <= args.slice <= args.duration or not 1 <= args.open_slice <= args.duration:
        p.error("--slice and --open-slice must be between 1 and --duration")
    if args.output is None:
        name = "throughput-quick.json" if args.quick else "throughput.json"
        args.output = BENCH / "results" / name
    return args


def preflight(args: argparse.Namespace) -> list[str]:
    """What keeps the bench from running, if anything."""
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
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems = preflight(args)
    if problems:
        sys.exit("bench/throughput.py cannot run:\n  " + "\n  ".join(problems))
    t = Transcript()
    if args.baseline_ref is None:
        return run(args, t, None)
    with baseline_worktree(args.baseline_ref) as baseline:
        return run(args, t, baseline)


if __name__ == "__main__":
    sys.exit(main())
