"""Reports: markdown tables, the figures table, floor and counter sections, environment, JSON."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from harness.counters import format_summary
from harness.figures import Figure, paired_ratio
from harness.floors import Check, Comparison
from harness.transcript import Transcript


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def md_table(header: list[str], align: list[str], rows: list[list[str]]) -> str:
    """A markdown table; `align` holds "---" (left) or "--:" (right) per column."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _load_label(f: Figure, open_rate: float | None, open_label: str) -> str:
    if f.load == "open":
        return f"open loop @ {fmt(open_rate, 0)} req/s{open_label}"
    return f"{f.load[1:]} conn" + ("s" if f.load != "c1" else "")


def _vs(f: Figure, base: Figure | None) -> str:
    if f.load != "c64":
        return "-"
    r, _ = paired_ratio(f, base, "rps")
    return "-" if r is None else f"{r:.2f}x"


def render_table(figures: list[Figure], open_rate: float | None, open_label: str) -> str:
    """Every figure's medians, and its 64-connection req/s against inline-onnx and single."""
    by = {(f.name, f.load): f for f in figures}
    inline, single = by.get(("inline-onnx", "c64")), by.get(("single", "c64"))
    header = ["configuration", "load", "req/s", "p50 ms", "p99 ms", "non-2xx", "errors"]
    header += ["req/s vs inline", "req/s vs single"]
    rows = []
    for f in figures:
        j = f.to_json()
        rows.append(
            [
                f.name,
                _load_label(f, open_rate, open_label),
                fmt(j["rps"], 0),
                fmt(j["p50_ms"], 3),
                fmt(j["p99_ms"], 3),
                str(j["non_2xx"]),
                str(j["errors"]),
                _vs(f, inline),
                _vs(f, single),
            ]
        )
    return md_table(header, ["---", "---", *["--:"] * 7], rows)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")


def save_run(out: Path, doc: dict[str, Any], transcript: Transcript) -> None:
    """A run's figures as <out>.json and what the terminal showed as <out>.md."""
    write_json(out.with_suffix(".json"), doc)
    transcript.save(out.with_suffix(".md"))


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""


def _run(cmd: list[str], cwd: Path) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (p.stdout or p.stderr).strip()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def environment(root: Path, *, server_cpu: int, load_cpu: int) -> dict[str, Any]:
    """Where and with what a run was measured: date, commit, CPU, versions."""
    packages = ("aiohttp", "onnxruntime", "numpy", "orjson", "uvloop")
    dirty = _run(["git", "status", "--porcelain", "--", "proxy", "config.toml"], root)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": _run(["git", "rev-parse", "HEAD"], root),
        "git_dirty": bool(dirty),
        "cpu": _cpu_model(),
        "cpus_online": os.cpu_count(),
        "server_cpu": server_cpu,
        "load_cpu": load_cpu,
        "python": platform.python_version(),
        **{name: _package_version(name) for name in packages},
        "wrk": (_run(["wrk", "-v"], root).splitlines() or [""])[0],
    }


def print_report(
    t: Transcript,
    *,
    title: str,
    figures: list[Figure],
    checks: list[Check],
    open_loop: tuple[float | None, str],
    diagnostics: dict[str, Any],
) -> None:
    """The figures table, the floor checks and mlproxy's counters, as markdown."""
    rate, note = open_loop
    t.out()
    t.out(title)
    t.out()
    t.out(render_table(figures, rate, " *" if note else ""))
    if note:
        t.out(f"\n\\* open loop{note}")
    t.out("\n### Floor checks\n")
    for c in checks:
        t.out(c.line())
    t.out("\n### mlproxy counters (/admin/status, during the 64-connection runs)\n")
    for name, d in diagnostics.items():
        for line in format_summary(name, "64-conn runs", d["c64"]):
            t.out(line)
    open_phase = {k: d["open"] for k, d in diagnostics.items() if d.get("open")}
    if open_phase:
        t.out("\n### mlproxy counters (/admin/status, during the open-loop runs)\n")
        for name, summary in open_phase.items():
            for line in format_summary(name, "open-loop runs", summary):
                t.out(line)
    for f in figures:
        if f.total("non_2xx") or f.errors():
            t.warn(
                f"{f.name} ({f.load}): {f.total('non_2xx')} non-2xx answers,"
                f" {f.errors()} errors: the figures are suspect"
            )


def comparison_lines(comparisons: list[Comparison], loads: dict[str, str]) -> list[str]:
    """One line per side-by-side comparison: the median ratio, each round's, the medians."""
    lines = []
    for c in comparisons:
        n, d = c.numerator, c.denominator
        what = "req/s" if n.key == "rps" else n.key.removesuffix("_ms")
        lines.append(
            f"- {n.config}/{d.config} {what}, {loads.get(n.load, n.load)}: median"
            f" {c.ratio:.3f}x of rounds [{c.rounds_text()}]; {c.medians()}"
        )
    return lines
