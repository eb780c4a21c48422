"""The micro-batcher, driven by its step function and futures (real numpy work, no sleeps)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from proxy.engine.batching import Batcher
from proxy.engine.runner import Runner
from proxy.errors import OverloadedError, UpstreamError


class Recorder:
    """A model function that records each batch it gets; it can be held to let a queue build."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.hold = threading.Event()
        self.hold.set()
        self.fail = fail

    def __call__(self, x: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
        self.hold.wait(timeout=10)
        self.batches.append(x.shape[0])
        if self.fail:
            raise RuntimeError("model exploded")
        return {"double": x * 2, "sum": x.sum(axis=1)}


@pytest.fixture
def runner() -> Any:
    runner = Runner(2, name="test")
    yield runner
    runner.close()


def make(run: Any, runner: Any, **kw: Any) -> Batcher:
    args = {"max_batch_size": 8, "max_delay_s": 10.0, "queue_timeout_s": 10.0, "max_runs": 1}
    args.update(kw)
    return Batcher(run, runner=runner, **args)


async def test_lone_request_runs_at_once(runner: Any) -> None:
    rec = Recorder()
    b = make(rec, runner)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = await asyncio.wait_for(b.submit(x), timeout=5)
    np.testing.assert_array_equal(out["double"], x * 2)
    assert rec.batches == [2]


async def test_requests_queued_behind_a_run_share_the_next_and_get_their_own_rows(
    runner: Any,
) -> None:
    rec = Recorder()
    b = make(rec, runner)
    rec.hold.clear()
    first = b.submit(np.zeros((1, 3), dtype=np.float32))
    b.flush()  # the step function: dispatch the first now; it is held inside the model
    xs = [np.full((k, 3), k, dtype=np.float32) for k in (1, 2, 3)]
    futs = [b.submit(x) for x in xs]
    assert b.queue_depth == 3
    rec.hold.set()
    await asyncio.wait_for(first, timeout=5)
    outs = await asyncio.wait_for(asyncio.gather(*futs), timeout=5)
    assert rec.batches == [1, 6]  # the three waiting requests went in one run
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_array_equal(out["double"], x * 2)
        np.testing.assert_array_equal(out["sum"], x.sum(axis=1))


async def test_batches_respect_max_batch_size(runner: Any) -> None:
    rec = Recorder()
    b = make(rec, runner, max_batch_size=4)
    rec.hold.clear()
    futs = [b.submit(np.ones((1, 2), dtype=np.float32)) for _ in range(10)]
    rec.hold.set()
    await asyncio.wait_for(asyncio.gather(*futs), timeout=5)
    assert rec.batches == [4, 4, 2]  # all ten queued in one loop iteration
    big = await asyncio.wait_for(b.submit(np.ones((9, 2), dtype=np.float32)), timeout=5)
    assert big["double"].shape == (9, 2)  # a request larger than a batch runs alone, whole


async def test_failed_batch_fails_every_waiter(runner: Any) -> None:
    rec = Recorder(fail=True)
    b = make(rec, runner)
    futs = [b.submit(np.ones((1, 2), dtype=np.float32)) for _ in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), timeout=5)
    assert all(isinstance(r, UpstreamError) and "model exploded" in str(r) for r in results)
    assert b.stats.failed_batches == 1


async def test_request_that_waited_too_long_is_shed(runner: Any) -> None:
    rec = Recorder()
    now = [100.0]
    b = make(rec, runner, queue_timeout_s=0.5, clock=lambda: now[0])
    rec.hold.clear()
    first = b.submit(np.ones((1, 2), dtype=np.float32))
    b.flush()
    late = b.submit(np.ones((1, 2), dtype=np.float32))
    now[0] += 0.6  # the run in flight took 600 ms
    on_time = b.submit(np.ones((1, 2), dtype=np.float32))
    rec.hold.set()
    await asyncio.wait_for(first, timeout=5)
    with pytest.raises(OverloadedError, match="queue wait 600 ms exceeded"):
        await asyncio.wait_for(late, timeout=5)
    await asyncio.wait_for(on_time, timeout=5)
    assert b.stats.shed == 1 and rec.batches == [1, 1]


async def test_slow_run_lets_a_second_run_start_after_max_delay(runner: Any) -> None:
    rec = Recorder()
    b = make(rec, runner, max_runs=2, max_delay_s=0.0)
    rec.hold.clear()
    first = b.submit(np.ones((1, 2), dtype=np.float32))
    b.flush()
    second = b.submit(np.ones((2, 2), dtype=np.float32))
    # the delay timer (0 s) dispatches the second while the first is still held
    for _ in range(1000):
        if b.in_flight == 2:
            break
        await asyncio.sleep(0)
    assert b.in_flight == 2 and b.queue_depth == 0
    rec.hold.set()
    await asyncio.wait_for(asyncio.gather(first, second), timeout=5)
    assert sorted(rec.batches) == [1, 2]


async def test_close_fails_queued_requests(runner: Any) -> None:
    rec = Recorder()
    b = make(rec, runner)
    rec.hold.clear()
    first = b.submit(np.ones((1, 2), dtype=np.float32))
    b.flush()
    queued = b.submit(np.ones((1, 2), dtype=np.float32))
    closing = asyncio.ensure_future(b.close())
    with pytest.raises(UpstreamError, match="shutting down"):
        await asyncio.wait_for(queued, timeout=5)
    rec.hold.set()
    await asyncio.wait_for(closing, timeout=5)
    await first


async def test_cheap_runs_go_inline_and_slow_ones_to_a_thread(runner: Any) -> None:
    main = threading.get_ident()
    threads: list[int] = []

    def run(x: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
        threads.append(threading.get_ident())
        return {"y": x}

    b = make(run, runner, inline_max_s=1.0)  # any measured cost is below a second
    for _ in range(3):
        await asyncio.wait_for(b.submit(np.ones((1, 2), dtype=np.float32)), timeout=5)
    assert threads[0] != main  # cost unknown: the first run goes to a thread
    assert threads[1:] == [main, main]  # then it is known to be cheap: inline
    assert b.stats.inline_batches == 2
    b.inline_max_s = 0.0  # nothing is cheap enough: every run on a thread
    await asyncio.wait_for(b.submit(np.ones((1, 2), dtype=np.float32)), timeout=5)
    assert threads[3] != main


def test_inline_limit_grows_only_when_a_thread_would_share_the_loops_one_cpu() -> None:
    from proxy.engine.batching import SOLO_CPU_INLINE_MAX_S, inline_limit_s

    assert inline_limit_s(50.0, cpus=2.0) == pytest.approx(50e-6)
    assert inline_limit_s(50.0, cpus=1.0) == SOLO_CPU_INLINE_MAX_S
    assert inline_limit_s(50.0, cpus=1.5) == SOLO_CPU_INLINE_MAX_S  # a 1.5-CPU quota
    assert inline_limit_s(5000.0, cpus=1.0) == pytest.approx(5e-3)  # a larger setting stands
    assert inline_limit_s(0.0, cpus=1.0) == 0.0  # 0 keeps every run on a thread


def test_usable_cpus_reads_affinity_and_the_cgroup_quota(tmp_path: Any) -> None:
    import os

    from proxy.engine.runner import usable_cpus

    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # half a CPU
    assert usable_cpus(cpu_max) == min(affinity, 0.5)
    cpu_max.write_text("garbage\n")
    assert usable_cpus(cpu_max) == affinity
    assert usable_cpus(tmp_path / "missing") == affinity
