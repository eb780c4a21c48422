"""bench/harness's pure parts: slice bookkeeping, medians, rotation, wrk's output, floors."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _bench_module(name: str) -> ModuleType:
    # bench/ runs as scripts (their folder on sys.path), so its modules import as `harness...`
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def slices() -> ModuleType:
    return _bench_module("harness.slices")


@pytest.fixture(scope="module")
def floors() -> ModuleType:
    return _bench_module("harness.floors")


@pytest.fixture(scope="module")
def figures() -> ModuleType:
    return _bench_module("harness.figures")


@pytest.fixture(scope="module")
def throughput() -> ModuleType:
    return _bench_module("throughput")


def wrk(rps: float, requests: int, p50: float, p99: float, non_2xx: int = 0) -> dict[str, Any]:
    return {
        "rps": rps,
        "requests": requests,
        "p50_ms": p50,
        "p75_ms": p50,
        "p90_ms": p99,
        "p99_ms": p99,
        "non_2xx": non_2xx,
        "socket_errors": 0,
    }


def test_wrk_slices_merge_to_requests_over_time(slices: ModuleType) -> None:
    # 10,000 requests in 1 s, then 5,000 in 1 s: 7,500 req/s, not the mean of anything else
    run = slices.merge_slices(
        [
            wrk(10_000, 10_000, 4.0, 9.0),
            wrk(5_000, 5_000, 8.0, 20.0, non_2xx=2),
            wrk(8_000, 8_000, 5.0, 10.0),
        ]
    )
    assert run["rps"] == pytest.approx(23_000 / 3.0, rel=1e-4)
    assert run["requests"] == 23_000
    assert run["p50_ms"] == 5.0 and run["p99_ms"] == 10.0  # medians of the slices
    assert run["non_2xx"] == 2 and run["slices"] == 3
    assert run["slice_rps"] == [10_000, 5_000, 8_000]


def test_open_loop_slices_merge(slices: ModuleType) -> None:
    def ol(measured: int, p50: float, sustained: bool, lag: float) -> dict[str, Any]:
        return {
            "target_rps": 1000.0,
            "duration_s": 2,
            "measured": measured,
            "achieved_rps": measured / 2,
            "p50_ms": p50,
            "p90_ms": p50 * 2,
            "p99_ms": p50 * 4,
            "non_2xx": 0,
            "errors": 1,
            "sustained": sustained,
            "dispatch_lag_p50_ms": lag,
            "dispatch_lag_p99_ms": lag * 3,
        }

    run = slices.merge_slices([ol(2000, 0.5, True, 0.01), ol(1990, 0.7, False, 0.05)])
    assert run["achieved_rps"] == pytest.approx(3990 / 4)
    assert run["sustained"] is False  # one slice the generator could not keep up is enough
    assert run["p50_ms"] == pytest.approx(0.6) and run["errors"] == 2
    assert run["dispatch_lag_p99_ms"] == pytest.approx(0.15)


def test_configurations_take_turns_and_the_first_cycle_is_not_counted(
    slices: ModuleType,
) -> None:
    order: list[str] = []
    speed = {"a": 100.0, "b": 200.0, "c": 300.0}

    def measure_one(name: str) -> dict[str, Any]:
        order.append(name)
        k = len(order)  # the first cycle is slow, as after the other servers' warm-ups
        rps = speed[name] / (2 if k <= 3 else 1)
        return wrk(rps, int(rps), 1.0, 2.0)

    runs = slices.interleaved(["a", "b", "c"], measure_one, duration=6, slice_s=2, first=1)
    # 6 s in 2 s slices: 3 counted cycles after 1 not counted, each cycle in a rotated order
    assert order == ["b", "c", "a", "c", "a", "b", "a", "b", "c", "b", "c", "a"]
    assert {n: r["rps"] for n, r in runs.items()} == pytest.approx(speed)
    assert all(r["slices"] == 3 for r in runs.values())


def test_rotation_gives_each_configuration_each_place(slices: ModuleType) -> None:
    names = ["a", "b", "c"]
    orders = [slices.rotated(names, i) for i in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


WRK_OUTPUT = """\
Running 1s test @ http://127.0.0.1:8080/v2/models/cancer/infer
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.52ms    1.10ms  20.31ms   80.00%
    Req/Sec    14.10k     0.50k   14.60k    90.00%
  Latency Distribution
     50%    4.35ms
     75%    5.01ms
     90%  850.00us
     99%    1.20s
  14123 requests in 1.00s, 5.03MB read
  Socket errors: connect 0, read 2, write 1, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:  14101.52
Transfer/sec:      5.02MB
"""


def test_wrk_output_is_parsed_with_its_units() -> None:
    load = _bench_module("harness.load")
    r = load.parse_wrk(WRK_OUTPUT)
    assert r["rps"] == 14101.52 and r["requests"] == 14123
    assert (r["p50_ms"], r["p75_ms"], r["p90_ms"], r["p99_ms"]) == (4.35, 5.01, 0.85, 1200.0)
    assert r["non_2xx"] == 7 and r["socket_errors"] == 6


def test_wrk_output_without_latency_is_refused() -> None:
    load = _bench_module("harness.load")
    text = "\n".join(line for line in WRK_OUTPUT.splitlines() if "%    " not in line)
    with pytest.raises(ValueError, match="50% latency"):
        load.parse_wrk(text)


def test_figure_medians_and_paired_ratios(figures: ModuleType) -> None:
    a = figures.Figure("a", "c64", [{"round": i, "rps": v} for i, v in enumerate([10, 30, 20])])
    b = figures.Figure("b", "c64", [{"round": i, "rps": v} for i, v in enumerate([10, 10, 40])])
    assert a.median("rps") == 20 and b.median("rps") == 10
    ratio, rounds = figures.paired_ratio(a, b, "rps")
    # the median of the per-round ratios (1, 3, 0.5), not the ratio of the medians (2)
    assert rounds == [1.0, 3.0, 0.5] and ratio == 1.0
    assert figures.paired_ratio(a, None, "rps") == (None, [])


# --------------------------------------------------------------------------- floors


def figure_set(
    figures: ModuleType, per_round: dict[tuple[str, str, str], list[float]]
) -> list[Any]:
    """Figures from per-round values: {(config, load, key): [round 0, round 1, ...]}."""
    by: dict[tuple[str, str], Any] = {}
    for (config, load, key), values in per_round.items():
        f = by.setdefault((config, load), figures.Figure(config, load))
        for i, v in enumerate(values):
            if len(f.runs) <= i:
                f.runs.append({"round": i, "non_2xx": 0, "socket_errors": 0})
            f.runs[i][key] = v
    return list(by.values())


PASSING = {
    ("inline-onnx", "c64", "rps"): [9000, 9500, 9200],
    ("batched-onnx", "c64", "rps"): [13500, 14000, 13600],
    ("single", "c64", "rps"): [13000, 13800, 13500],
    ("single-nomon", "c64", "rps"): [14000, 14500, 14200],
    ("canary", "c64", "rps"): [12800, 13000, 13300],
    ("shadow", "c64", "rps"): [13100, 13600, 13400],
    ("inline-onnx", "c1", "p50_ms"): [0.18, 0.19, 0.18],
    ("single", "c1", "p50_ms"): [0.22, 0.23, 0.22],
    ("single", "open", "p50_ms"): [0.60, 0.65, 0.62],
    ("shadow", "open", "p50_ms"): [0.66, 0.70, 0.65],
}


def test_every_floor_passes_on_good_figures(
    floors: ModuleType, figures: ModuleType, throughput: ModuleType
) -> None:
    checks = floors.judge_all(
        throughput.FLOORS, figure_set(figures, PASSING), {"open": "at 6,000 req/s, "}
    )
    assert [c.ok for c in checks] == [True] * 8
    assert [c.name for c in checks] == [
        "single req/s >= 1.3x inline-onnx",
        "single req/s >= 0.9x batched-onnx",
        "canary req/s >= 0.9x single",
        "shadow req/s >= 0.75x single",
        "single (all monitoring on) req/s >= 0.9x single-nomon (drift off)",
        "fixed rate, shadow p50 <= 1.3x single p50",
        "1 connection, single p50 <= inline-onnx p50 + 0.05 ms",
        "no non-2xx answers and no socket errors in measured runs",
    ]
    # the details read as they did before the floors became a table
    assert checks[0].detail == (
        "single/inline-onnx side by side: median 1.45x of rounds [1.44, 1.45, 1.47]"
        " (floor 1.30x); medians 13,500 / 9,200 req/s = 1.47x"
    )
    assert checks[5].detail.startswith("at 6,000 req/s, shadow/single side by side: median 1.08x")
    assert checks[5].detail.endswith("(ceiling 1.30x); medians 0.660 / 0.620 ms")
    assert checks[6].detail == (
        "single 0.220 ms vs inline-onnx 0.180 ms: +0.040 ms (ceiling +0.050 ms)"
    )
    goals = [floors.judge(g, figure_set(figures, PASSING)) for g in throughput.GOALS]
    assert [(g.name, g.ok) for g in goals] == [("goal: single req/s >= 1.0x batched-onnx", False)]


def test_floors_fail_on_figures_past_their_bounds(
    floors: ModuleType, figures: ModuleType, throughput: ModuleType
) -> None:
    bad = dict(PASSING)
    bad[("canary", "c64", "rps")] = [11000, 12000, 12100]  # 0.85, 0.87, 0.90 of single
    bad[("shadow", "open", "p50_ms")] = [0.90, 0.70, 0.85]  # 1.50, 1.08, 1.37 of single
    bad[("single", "c1", "p50_ms")] = [0.25, 0.24, 0.25]  # +0.06 ms over inline-onnx
    bad[("batched-onnx", "c64", "rps")] = [15000, 15500, 15500]  # single 0.87-0.89x
    checks = {c.name: c for c in floors.judge_all(throughput.FLOORS, figure_set(figures, bad))}
    assert checks["canary req/s >= 0.9x single"].ok is False
    assert checks["fixed rate, shadow p50 <= 1.3x single p50"].ok is False
    assert checks["1 connection, single p50 <= inline-onnx p50 + 0.05 ms"].ok is False
    assert checks["single req/s >= 0.9x batched-onnx"].ok is False
    assert checks["single req/s >= 1.3x inline-onnx"].ok is True


def test_a_ratio_floor_judges_the_median_of_rounds_not_of_medians(
    floors: ModuleType, figures: ModuleType
) -> None:
    floor = floors.Floor(
        title="a req/s >= {bound}x b",
        numerator=floors.Measure(config="a", load="c64", key="rps"),
        denominator=floors.Measure(config="b", load="c64", key="rps"),
        bound=1.5,
        kind=floors.Kind.RATIO_AT_LEAST,
    )
    # medians 20 / 10 = 2.0x would pass; per round 1.0, 3.0, 0.5 -> median 1.0x fails
    figs = figure_set(
        figures, {("a", "c64", "rps"): [10, 30, 20], ("b", "c64", "rps"): [10, 10, 40]}
    )
    check = floors.judge(floor, figs)
    assert check.ok is False and "median 1.00x of rounds [1.00, 3.00, 0.50]" in check.detail
    assert check.detail.endswith("medians 20 / 10 req/s = 2.00x")
    assert check.line().startswith("- FAIL a req/s >= 1.5x b: ")


def test_a_floor_without_its_figures_is_not_measured(
    floors: ModuleType, figures: ModuleType, throughput: ModuleType
) -> None:
    only_c64 = {k: v for k, v in PASSING.items() if k[1] == "c64"}
    checks = floors.judge_all(throughput.FLOORS, figure_set(figures, only_c64))
    not_measured = [c.name for c in checks if c.ok is None]
    assert not_measured == [
        "fixed rate, shadow p50 <= 1.3x single p50",
        "1 connection, single p50 <= inline-onnx p50 + 0.05 ms",
    ]
    assert all(c.detail == "not measured" for c in checks if c.ok is None)


def test_non_2xx_answers_fail_the_clean_runs_check(floors: ModuleType, figures: ModuleType) -> None:
    figs = figure_set(figures, {("single", "c64", "rps"): [1.0, 1.0]})
    figs[0].runs[1]["non_2xx"] = 3
    check = floors.clean_check(figs)
    assert check.ok is False and "('single', 'c64', 3)" in check.detail


def test_the_floor_table_is_data(floors: ModuleType, throughput: ModuleType) -> None:
    rows = [f.to_json() for f in throughput.FLOORS]
    assert [(r["bound"], r["kind"]) for r in rows] == [
        (1.3, "ratio_at_least"),
        (0.9, "ratio_at_least"),
        (0.9, "ratio_at_least"),
        (0.75, "ratio_at_least"),
        (0.9, "ratio_at_least"),
        (1.3, "ratio_at_most"),
        (0.05, "excess_at_most"),
    ]
    assert rows[1]["denominator"] == ["batched-onnx", "c64", "rps"]
    assert [g.bound for g in throughput.GOALS] == [1.0]
    assert rows[5]["numerator"] == ["shadow", "open", "p50_ms"]


def test_the_baseline_is_measured_beside_single(throughput: ModuleType) -> None:
    baseline = _bench_module("harness.worktree").Baseline(
        ref="788b268", commit="0" * 40, path=Path("/nonexistent"), proxy_file="x"
    )
    names = [s.name for s in throughput.server_specs(baseline)]
    assert names == [
        "http-limit",
        "inline-onnx",
        "batched-onnx",
        "single",
        "single@788b268",
        "single-nomon",
        "canary",
        "shadow",
    ]
    order = throughput.figure_order(baseline)
    assert order.index(("single@788b268", "c64")) == order.index(("single", "c64")) + 1
    assert order.index(("single@788b268", "c1")) == order.index(("single", "c1")) + 1
    assert [s.name for s in throughput.server_specs()] == [n for n in names if "@" not in n]


def _overload_runs(*, shed_07: int, drift: float) -> dict[str, Any]:
    """A passing overload run's figures, capacity 1,000 rps, with the 0.7 x run's sheds and the
    capacity drift given."""

    def open_run(goodput: float, p99: float, shed: int) -> dict[str, Any]:
        return {
            "goodput_rps": goodput,
            "admitted_p50_ms": p99 / 4,
            "admitted_p99_ms": p99,
            "shed_p50_ms": 1.0,
            "shed_p99_ms": 2.0,
            "shed": shed,
            "measured": 6000,
            "max_connections": 256,
            "sustained": True,
            "errors": 0,
            "health_max_ms": 5.0,
            "health_failed": 0,
            "rss_mb": 100.0,
        }

    def closed_run(conns: int) -> dict[str, Any]:
        return {
            "goodput_rps": 950.0,
            "shed": 0,
            "requests": 5700,
            "p50_ms": conns / 1.0,
            "p99_ms": 1.5 * conns,
            "health_max_ms": 5.0,
            "health_failed": 0,
            "rss_mb": 100.0,
        }

    return {
        "capacity_rps": 1000.0,
        "capacity_after_rps": 1000.0 * drift,
        "drift": drift,
        "open": {
            "0.7": open_run(700.0, 10.0, shed_07),
            "2.0": open_run(900.0, 20.0, 6000),
        },
        "closed": {"64": closed_run(64), "1000": closed_run(1000)},
        "r": {"c_served_us": 100.0, "2.0": 0.05, "3.0": 0.08},
    }


def test_overload_floors_need_a_quiet_reference_and_a_steady_machine() -> None:
    overload = _bench_module("overload")
    transcript = _bench_module("harness.transcript")
    good = _overload_runs(shed_07=0, drift=1.02)
    assert all(passed for _, _, _, passed in overload.floors(good))
    assert overload.report(transcript.Transcript(), {"single": good})
    # a 0.7 x run that itself shed is no unloaded reference: the p99 ratio is not judged
    loaded = _overload_runs(shed_07=600, drift=1.0)
    verdicts = {name: passed for name, _, _, passed in overload.floors(loaded)}
    assert verdicts["open 2x: admitted p99 / p99 at 0.7x <= 3"] is None
    assert not overload.report(transcript.Transcript(), {"single": loaded})
    # the machine's speed moved 23% under the run: no verdict, whatever the figures
    drifted = _overload_runs(shed_07=0, drift=0.77)
    assert all(passed for _, _, _, passed in overload.floors(drifted))
    assert not overload.report(transcript.Transcript(), {"single": drifted})


def test_overload_ab_refuses_a_load_it_cannot_read_before_starting_anything() -> None:
    ab = _bench_module("overload_ab")
    with pytest.raises(SystemExit) as exc:
        ab.main(["--ref", "main", "2", "c1000", "fast"])
    assert exc.value.code == 2
    assert ab.median([{"p99_ms": 3.0}, {"p99_ms": None}, {"p99_ms": 1.0}], "p99_ms") == 2.0


def test_soak_growth_is_judged_from_the_first_sample_past_the_warmup() -> None:
    soak = _bench_module("soak")
    samples = [
        {"requests": 0, "rss_mb": 100.0},
        {"requests": 60_000, "rss_mb": 150.0},  # warm-up: arenas, the prediction store's ring
        {"requests": 120_000, "rss_mb": 160.0},
        {"requests": 1_000_000, "rss_mb": 168.0},
    ]
    grew, reference = soak.growth(samples, 100_000)
    assert reference["requests"] == 120_000 and abs(grew - 0.05) < 1e-9
    assert soak.growth(samples[:2], 100_000) == (None, {})  # nothing past the warm-up
    assert soak.growth(samples[:3], 100_000)[0] is None  # one sample: no growth to judge
