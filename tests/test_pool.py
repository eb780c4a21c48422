"""Counters published by real worker processes and summed by a reader (engine/pool.py): the
pooled counts equal what every worker counted, a restarted worker counts on from its slot's row,
and the group's exit leaves nothing in /dev/shm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.schema import VersionKey
from proxy.engine.counters import (
    MODEL_COLUMNS,
    PROCESS_COLUMNS,
    VERSION_COLUMNS,
    Counters,
    FeedbackOutcome,
    Refusal,
    ReloadOutcome,
)
from proxy.engine.pool import CountsPool
from proxy.engine.shared import owned_by, unlink_owned
from proxy.engine.stats import STATS_COLUMNS, LatencyHistogram, MirrorStats, VersionStats

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 20.0
V1, V2 = VersionKey("cancer", "v1"), VersionKey("cancer", "v2")

# A worker of group argv[1], slot argv[2] of 2: adopt the slot's counts, count argv[3]
# requests to v1 (latency 1 ms each, every 10th an error) and argv[4] to v2, shed one
# request, join one feedback, publish, print the v1 requests it holds, wait for stdin.
WORKER = textwrap.dedent(
    """
    import sys
    from proxy.config.schema import VersionKey
    from proxy.engine.counters import Counters, FeedbackOutcome, Refusal
    from proxy.engine.pool import CountsPool
    group, slot, n1, n2 = (int(a) for a in sys.argv[1:5])
    V1, V2 = VersionKey("cancer", "v1"), VersionKey("cancer", "v2")
    pool = CountsPool(group, slots=2, slot=slot)
    counters = Counters()
    pool.adopt(counters, [V1, V2])
    for key, n in ((V1, n1), (V2, n2)):
        st = counters.version(key)
        for i in range(n):
            st.started(rows=2)
            (st.failed if i % 10 == 9 else st.answered)(0.001)
    counters.shed()
    counters.fallback(V2)
    counters.refused(Refusal.BODY_TIMEOUT)
    counters.feedback("cancer", FeedbackOutcome.JOINED)
    pool.publish(counters, [V1, V2])
    print(counters.version(V1).requests, flush=True)
    sys.stdin.readline()
    pool.close()
    """
)


def _worker(slot: int, n1: int, n2: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(os.getpid()), str(slot), str(n1), str(n2)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _published(proc: subprocess.Popen[str]) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.isdigit(), f"worker said {line!r}; stderr: {proc.stderr and proc.stderr.read()}"
    return int(line)


def test_pooled_counts_are_every_workers_sum_and_survive_a_kill() -> None:
    procs = [_worker(0, 300, 0), _worker(1, 200, 100)]
    reader = CountsPool(os.getpid(), slots=2, slot=0)
    try:
        assert [_published(p) for p in procs] == [300, 200]
        total = reader.pooled([V1, V2])
        v1, v2 = total.version(V1), total.version(V2)
        assert (v1.requests, v1.errors, v1.rows) == (500, 50, 1000)
        assert (v2.requests, v2.errors, v2.rows) == (100, 10, 200)
        assert v1.latency.count == 500 and abs(v1.latency.sum - 0.5) < 1e-9
        assert v1.latency.quantile(0.5) == _median_of_one(0.001)
        assert total.shed_total == 2
        assert total.fallbacks_of(V2) == 2 and total.fallbacks_of(V1) == 0
        assert total.refused_counts()[Refusal.BODY_TIMEOUT] == 2
        assert total.feedback_counts() == {("cancer", FeedbackOutcome.JOINED): 2}
        assert total.reloads() == {str(o): 0 for o in ReloadOutcome}

        procs[1].kill()  # kill -9: its row stays as last published
        assert procs[1].wait(DEADLINE_S) == -signal.SIGKILL
        assert reader.pooled([V1]).version(V1).requests == 500
        again = _worker(1, 7, 0)  # the restarted worker adopts slot 1's counts
        procs.append(again)
        assert _published(again) == 207
        assert reader.pooled([V1]).version(V1).requests == 507  # never backwards
        assert reader.pooled([]).shed_total == 3

        assert procs[0].communicate("\n", timeout=DEADLINE_S)[1] == ""  # no tracker warning
        assert procs[0].returncode == 0
        # a worker's exit removes nothing: the segments it made belong to the group
        assert len(owned_by(os.getpid())) == 4  # the process's, v1's, v2's and the model's
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(DEADLINE_S)
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()
        reader.close()
        unlink_owned(os.getpid())
    assert owned_by(os.getpid()) == []


def _median_of_one(seconds: float) -> float | None:
    h = LatencyHistogram()
    h.observe(seconds)
    return h.quantile(0.5)


counts = st.integers(min_value=0, max_value=2**40)
sums = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    a=st.tuples(counts, counts, counts, sums, counts, counts, sums),
    b=st.tuples(counts, counts, counts, sums, counts, counts, sums),
    lat=st.lists(st.floats(min_value=1e-6, max_value=100.0), max_size=20),
)
def test_a_sum_of_vectors_reads_as_the_sum_of_the_statistics(
    a: tuple[int, int, int, float, int, int, float],
    b: tuple[int, int, int, float, int, int, float],
    lat: list[float],
) -> None:
    def stats(t: tuple[int, int, int, float, int, int, float], extra: list[float]) -> VersionStats:
        s = VersionStats(
            requests=t[0],
            errors=t[1],
            rows=t[2],
            mirror=MirrorStats(sent=t[4], agreed=t[5], abs_diff_sum=t[6], abs_diff_count=t[4]),
        )
        s.latency.sum = t[3]
        for x in extra:
            s.latency.observe(x)
            s.mirror.latency.observe(x / 2)
        return s

    sa, sb = stats(a, lat), stats(b, lat[:3])
    va, vb = np.zeros(STATS_COLUMNS, dtype=np.int64), np.zeros(STATS_COLUMNS, dtype=np.int64)
    sa.write(va)
    sb.write(vb)
    both = VersionStats.from_vector(va + vb)
    assert (both.requests, both.errors, both.rows) == (a[0] + b[0], a[1] + b[1], a[2] + b[2])
    assert both.latency.counts.tolist() == (sa.latency.counts + sb.latency.counts).tolist()
    assert abs(both.latency.sum - (sa.latency.sum + sb.latency.sum)) <= 2e-9
    m = both.mirror
    assert (m.sent, m.agreed, m.abs_diff_count) == (a[4] + b[4], a[5] + b[5], a[4] + b[4])
    assert abs(m.abs_diff_sum - (a[6] + b[6])) <= 2e-9
    assert (
        m.latency.counts.tolist() == (sa.mirror.latency.counts + sb.mirror.latency.counts).tolist()
    )
    alone, expected = VersionStats.from_vector(va).summary(), sa.summary()
    diff, want = alone["mirror"].pop("mean_abs_diff"), expected["mirror"].pop("mean_abs_diff")
    assert alone == expected
    assert (diff is None) == (want is None) and abs((diff or 0.0) - (want or 0.0)) <= 1e-9


def test_counters_round_trip_through_their_vectors() -> None:
    c = Counters()
    c.version(V1).started(3)
    c.version(V1).answered(0.002)
    c.fallback(V1)
    c.shed()
    c.reload(ReloadOutcome.ERROR)
    c.nonfinite("cancer")
    c.refused(Refusal.MALFORMED_HTTP)
    c.feedback("cancer", FeedbackOutcome.UNKNOWN_ID)
    v = np.zeros(VERSION_COLUMNS, dtype=np.int64)
    c.write_version(V1, v)
    p = np.zeros(PROCESS_COLUMNS, dtype=np.int64)
    c.write_process(p)
    m = np.zeros(MODEL_COLUMNS, dtype=np.int64)
    c.write_model("cancer", m)
    back = Counters()
    back.read_version(V1, v)
    back.read_process(p)
    back.read_model("cancer", m)
    assert back.version(V1).summary() == c.version(V1).summary()
    assert back.fallbacks_of(V1) == 1
    assert (back.shed_total, back.reloads(), back.refused_counts()) == (
        c.shed_total,
        c.reloads(),
        c.refused_counts(),
    )
    assert back.nonfinite_counts() == {"cancer": 1}
    assert back.feedback_counts() == c.feedback_counts()
