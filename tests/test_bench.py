"""bench/throughput.py's bookkeeping: how slices taken in turn become one run per configuration."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def throughput() -> ModuleType:
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "bench" / "throughput.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["throughput"] = module
    spec.loader.exec_module(module)
    return module


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


def test_wrk_slices_merge_to_requests_over_time(throughput: ModuleType) -> None:
    # 10,000 requests in 1 s, then 5,000 in 1 s: 7,500 req/s, not the mean of anything else
    run = throughput.merge_slices(
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


def test_open_loop_slices_merge(throughput: ModuleType) -> None:
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

    run = throughput.merge_slices([ol(2000, 0.5, True, 0.01), ol(1990, 0.7, False, 0.05)])
    assert run["achieved_rps"] == pytest.approx(3990 / 4)
    assert run["sustained"] is False  # one slice the generator could not keep up is enough
    assert run["p50_ms"] == pytest.approx(0.6) and run["errors"] == 2
    assert run["dispatch_lag_p99_ms"] == pytest.approx(0.15)


def test_configurations_take_turns_and_the_first_cycle_is_not_counted(
    throughput: ModuleType,
) -> None:
    order: list[str] = []
    speed = {"a": 100.0, "b": 200.0, "c": 300.0}

    def measure_one(name: str) -> dict[str, Any]:
        order.append(name)
        k = len(order)  # the first cycle is slow, as after the other servers' warm-ups
        rps = speed[name] / (2 if k <= 3 else 1)
        return wrk(rps, int(rps), 1.0, 2.0)

    runs = throughput.interleaved(["a", "b", "c"], measure_one, duration=6, slice_s=2, first=1)
    # 6 s in 2 s slices: 3 counted cycles after 1 not counted, each cycle in a rotated order
    assert order == ["b", "c", "a", "c", "a", "b", "a", "b", "c", "b", "c", "a"]
    assert {n: r["rps"] for n, r in runs.items()} == pytest.approx(speed)
    assert all(r["slices"] == 3 for r in runs.values())
