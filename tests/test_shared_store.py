"""Predictions in shared memory (monitoring/shared_store.py): feedback reaching any worker joins
any worker's answer, once; made-up ids of two workers never collide; evicted and rewritten
entries are not found."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from proxy.engine.shared import SharedCounts, owned_by, unlink_owned
from proxy.monitoring.shared_store import SharedPredictionStore, columns
from proxy.protocol.ids import RequestIds

SECRET = b"s" * 32


@pytest.fixture
def stores() -> Iterator[tuple[SharedPredictionStore, SharedPredictionStore, list[RequestIds]]]:
    """Two workers' stores (capacity 8) on one segment, with the group's shared secret."""
    seg = SharedCounts.open(os.getpid(), "store-test", slots=2, columns=columns(8))
    ids = [RequestIds(SECRET, start=k + 1, step=2) for k in range(2)]
    made = [SharedPredictionStore(seg, slot=k, capacity=8, ids=ids[k]) for k in range(2)]
    for s in made:
        s.know(["v1", "v2"])
    yield made[0], made[1], ids
    seg.close()
    unlink_owned(os.getpid())
    assert owned_by(os.getpid()) == []


def test_feedback_on_another_worker_joins_once(
    stores: tuple[SharedPredictionStore, SharedPredictionStore, list[RequestIds]],
) -> None:
    a, b, ids = stores
    rid, seq = ids[0].new()
    assert seq % 2 == 1  # worker 0 of 2 makes 1, 3, 5, ...
    other, other_seq = ids[1].new()
    assert other_seq % 2 == 0 and other != rid
    a.put(rid, "v2", np.array([1]), seq)
    b.put("client-7", "v1", np.array([0, 1, 1]))  # the client's own id, 3 rows
    got = b.pop(rid)  # worker 1 joins worker 0's answer
    assert got is not None and got.version == "v2" and got.labels.tolist() == [1]
    assert a.get(rid) is None and b.get(rid) is None  # joined once, on either worker
    own = a.pop("client-7")
    assert own is not None and own.version == "v1" and own.labels.tolist() == [0, 1, 1]
    assert b.get("client-7") is None
    # an id with a forged tag, and one never made, are not found
    assert b.get(rid[:-1] + ("0" if rid[-1] != "0" else "1")) is None
    assert b.get(other) is None


def test_the_newest_answer_to_a_client_id_wins_and_floats_come_back(
    stores: tuple[SharedPredictionStore, SharedPredictionStore, list[RequestIds]],
) -> None:
    a, b, _ = stores
    a.put("same", "v1", np.array([0]))
    b.put("same", "v2", np.array([2.5], dtype=np.float32))  # a regression answer, later
    got = a.pop("same")
    assert got is not None and got.version == "v2" and got.labels.tolist() == [2.5]
    older = a.pop("same")  # the older answer stays until it is joined too
    assert older is not None and older.version == "v1"


def test_evicted_predictions_are_not_found(
    stores: tuple[SharedPredictionStore, SharedPredictionStore, list[RequestIds]],
) -> None:
    a, b, ids = stores
    made = []
    for _ in range(9):  # one more than the capacity of 8
        rid, seq = ids[0].new()
        a.put(rid, "v1", np.array([1]), seq)
        made.append(rid)
    assert b.get(made[0]) is None  # its entry was taken by the ninth
    assert a.evicted == 1
    assert all(b.get(r) is not None for r in made[1:])
    for i in range(20):  # labels of 2 rows each: the arena (16 values) wraps
        a.put(f"c{i}", "v1", np.array([1, 0]))
    assert b.get("c0") is None and b.get("c19") is not None
    assert len(a) == 8 + 8
