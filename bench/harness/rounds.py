"""Rounds of fresh servers: configurations measured side by side in slices taken in turn.

Phase 1 (closed loop): every configuration at 64 connections, then a few at 1 connection.
Phase 2 (open loop): a few configurations at one fixed rate. bench/README.md says why.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.counters import batching_summary, merge_summaries
from harness.figures import Figure
from harness.load import run_open_loop, run_wrk
from harness.report import fmt
from harness.servers import INFER_PATH, Server, ServerSpec, running
from harness.slices import interleaved, rotated
from harness.transcript import Transcript

CONNS = 64
OPEN_LOOP_FACTORS = (1.0, 0.75, 0.5, 0.35, 0.25)  # of the target rate, tried in turn


@dataclass(frozen=True, slots=True)
class Settings:
    """How long and where: seconds per run and slice, rounds, warm-ups, the two CPUs."""

    duration: int
    runs: int
    warmup: int
    slice: int
    open_slice: int
    open_warmup: float
    server_cpu: int
    load_cpu: int


@dataclass
class OpenLoop:
    """Phase 2's rate: the target (half of single's capacity) and what was used."""

    target: float
    rate: float | None = None
    note: str = ""


@dataclass
class Rounds:
    """One bench run's servers, request files and figures, filled in round by round."""

    settings: Settings
    tmp: Path
    transcript: Transcript
    specs: dict[str, ServerSpec]
    bodies: list[bytes]
    figures: dict[tuple[str, str], Figure] = field(default_factory=dict)
    parts: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    ends: dict[str, list[Any]] = field(default_factory=dict)
    open_loop: OpenLoop = field(default_factory=lambda: OpenLoop(target=0.0))

    @property
    def lua(self) -> Path:
        return self.tmp / "infer.lua"

    @property
    def bodies_file(self) -> Path:
        return self.tmp / "bodies.txt"

    def fig(self, name: str, load: str) -> Figure:
        return self.figures.setdefault((name, load), Figure(name, load))

    def log(self, msg: str) -> None:
        self.transcript.log(msg)

    def start_all(self, stack: contextlib.ExitStack, names: list[str], i: int) -> dict[str, Server]:
        """Start `names` afresh, each warmed up by a discarded wrk run."""
        s, t = self.settings, self.transcript
        self.log(f"== round {i + 1}/{s.runs}: starting {', '.join(names)}")
        run = functools.partial(
            running, tmp=self.tmp, cpu=s.server_cpu, probe_body=self.bodies[0], transcript=t
        )
        servers = {n: stack.enter_context(run(self.specs[n])) for n in names}
        for name, srv in servers.items():
            w = run_wrk(
                srv.base + INFER_PATH, self.lua, conns=CONNS, duration=s.warmup, cpu=s.load_cpu
            )
            self.log(f"   {name} warm-up ({s.warmup} s, discarded): {w['rps']:,.0f} req/s")
            if w["non_2xx"] or w["socket_errors"]:
                t.warn(
                    f"{name} warm-up: {w['non_2xx']} non-2xx, {w['socket_errors']} socket errors"
                )
        return servers

    def wrk_slice(self, servers: dict[str, Server], conns: int, name: str) -> dict[str, Any]:
        url, s = servers[name].base + INFER_PATH, self.settings
        return run_wrk(url, self.lua, conns=conns, duration=s.slice, cpu=s.load_cpu)

    def open_run(self, port: int, rate: float, duration: int) -> dict[str, Any]:
        s = self.settings
        return run_open_loop(
            port,
            self.bodies_file,
            rate=rate,
            duration=duration,
            warmup=s.open_warmup,
            cpu=s.load_cpu,
        )

    def open_slice(self, servers: dict[str, Server], rate: float, name: str) -> dict[str, Any]:
        return self.open_run(servers[name].port, rate, self.settings.open_slice)

    def slices(
        self, names: list[str], one: Callable[[str], dict[str, Any]], slice_s: int, i: int
    ) -> dict[str, dict[str, Any]]:
        return interleaved(names, one, self.settings.duration, slice_s, i)

    def diagnostics(self) -> dict[str, Any]:
        """mlproxy's counters per configuration, summed over the rounds of each phase."""
        return {
            name: {
                "c64": merge_summaries(p["c64"]),
                "open": merge_summaries(p["open"]),
                "status_after_64_conns_per_round": self.ends[name],
            }
            for name, p in self.parts.items()
        }


def closed_round(rounds: Rounds, i: int, c1_names: list[str]) -> None:
    """Phase 1, round i: every configuration at 64 connections, then `c1_names` at 1."""
    s = rounds.settings
    with contextlib.ExitStack() as stack:
        servers = rounds.start_all(stack, list(rounds.specs), i)
        names = list(servers)
        before = {n: servers[n].admin_status() for n in names}
        slicing = f"{s.duration} s each in {s.slice} s slices taken in turn"
        rounds.log(f"== round {i + 1}/{s.runs}: {CONNS} connections, {slicing}")
        c64 = rounds.slices(names, functools.partial(rounds.wrk_slice, servers, CONNS), s.slice, i)
        for name in rotated(names, i):
            r = {**c64[name], "round": i}
            rounds.fig(name, "c64").runs.append(r)
            rounds.log(
                f"   {name}: {r['rps']:,.0f} req/s, p50 {r['p50_ms']:.3f} ms,"
                f" p99 {r['p99_ms']:.3f} ms, non-2xx {r['non_2xx']},"
                f" socket errors {r['socket_errors']}"
            )
        after = {n: servers[n].admin_status() for n in names}
        rounds.log(f"== round {i + 1}/{s.runs}: 1 connection, {slicing}")
        c1 = rounds.slices(c1_names, functools.partial(rounds.wrk_slice, servers, 1), s.slice, i)
        for name, r in c1.items():
            rounds.fig(name, "c1").runs.append({**r, "round": i})
            rounds.log(
                f"   {name}: {r['rps']:,.0f} req/s, p50 {r['p50_ms']:.3f} ms,"
                f" p99 {r['p99_ms']:.3f} ms"
            )
        for name, srv in servers.items():
            if srv.spec.kind == "mlproxy":
                p = rounds.parts.setdefault(name, {"c64": [], "open": []})
                p["c64"].append(batching_summary(before[name], after[name]))
                rounds.ends.setdefault(name, []).append(after[name])
        rounds.log(f"== round {i + 1}/{s.runs}: stopping the servers")


def log_open(t: Transcript, name: str, r: dict[str, Any]) -> None:
    t.log(
        f"   {name} @ {r['target_rps']:,.0f} req/s: {r['achieved_rps']:,.0f} req/s answered,"
        f" p50 {fmt(r['p50_ms'], 3)} ms, p99 {fmt(r['p99_ms'], 3)} ms, non-2xx {r['non_2xx']},"
        f" errors {r['errors']}, generator lag p50/p99 {r['dispatch_lag_p50_ms']}/"
        f"{r['dispatch_lag_p99_ms']} ms, sustained {r['sustained']}"
    )


def open_loop_rate(rounds: Rounds, srv: Server, target: float) -> float:
    """`target` req/s, or the highest of OPEN_LOOP_FACTORS * target the generator keeps up with
    (a calibration run against `srv`, not counted)."""
    s, rate = rounds.settings, target
    for factor in OPEN_LOOP_FACTORS:
        rate = target * factor
        r = rounds.open_run(srv.port, rate, s.duration)
        log_open(rounds.transcript, f"{srv.spec.name} (calibration)", r)
        if r["sustained"]:
            return rate
        rounds.log(f"   the generator fell behind at {rate:,.0f} req/s; trying a lower rate")
    rounds.transcript.warn(
        f"the open-loop generator fell behind even at {rate:,.0f} req/s; using it anyway"
    )
    return rate


def open_round(rounds: Rounds, i: int, names: list[str], ol: OpenLoop) -> None:
    """Phase 2, round i: `names` at a fixed rate, side by side (the first one calibrates)."""
    s = rounds.settings
    with contextlib.ExitStack() as stack:
        servers = rounds.start_all(stack, names, i)
        if ol.rate is None:
            rounds.log(f"== open-loop rate: half of single's median {2 * ol.target:,.0f} req/s")
            ol.rate = open_loop_rate(rounds, servers[names[0]], ol.target)
            if ol.rate < ol.target:
                ol.note = (
                    f" (the generator could not sustain the target"
                    f" {ol.target:,.0f} req/s = half of single's capacity)"
                )
                rounds.transcript.warn(
                    f"open loop: {ol.note.strip(' ()')}; used {ol.rate:,.0f} req/s"
                )
        before = {n: servers[n].admin_status() for n in names}
        rounds.log(
            f"== round {i + 1}/{s.runs}: open loop @ {ol.rate:,.0f} req/s,"
            f" {s.duration} s each in {s.open_slice} s slices taken in turn"
            f" (each after {s.open_warmup:g} s not measured)"
        )
        one = functools.partial(rounds.open_slice, servers, ol.rate)
        for name, r in rounds.slices(names, one, s.open_slice, i).items():
            rounds.fig(name, "open").runs.append({**r, "round": i})
            log_open(rounds.transcript, name, r)
        for name in names:
            end = servers[name].admin_status()
            rounds.parts[name]["open"].append(batching_summary(before[name], end))
        rounds.log(f"== round {i + 1}/{s.runs}: stopping the servers")
