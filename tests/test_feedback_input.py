"""What feedback and infer accept, over a real server: labels that are classes of the model (or
finite numbers for a regressor), no booleans for numbers, and generated ids a client cannot
make up by counting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from proxy.errors import InvalidInputError
from proxy.monitoring.feedback import PredictionStore
from proxy.protocol.codec import TensorSpec, parse_infer_request
from proxy.protocol.feedback import Classes, Values, parse_feedback, parse_truth
from proxy.protocol.ids import RequestIds

from .helpers import infer_body, model_section


@pytest.fixture
async def cancer(start: Any, write_config: Any, model_repo: Path) -> Any:
    client, serving = await start(write_config(model_section(repo=model_repo)))
    return client, serving


async def predict(client: Any, rows: np.ndarray[Any, Any]) -> tuple[str, list[int]]:
    """Infer without an id: (the id the proxy made up, the labels it answered)."""
    resp = await client.post("/v2/models/cancer/infer", json=infer_body(rows))
    assert resp.status == 200, await resp.text()
    doc = await resp.json()
    return doc["id"], doc["outputs"][0]["data"]


async def feedback(client: Any, doc: Any, model: str = "cancer") -> tuple[int, str]:
    resp = await client.post(f"/v2/models/{model}/feedback", data=orjson.dumps(doc))
    body = await resp.json()
    return resp.status, body.get("error", "") if resp.status != 200 else body


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("label", "says"),
    [
        (7, "label 7 is not a class of cancer (classes: 0, 1)"),
        (-1, "label -1 is not a class of cancer (classes: 0, 1)"),
        (2**63, "label 9223372036854775808 is not a class of cancer (classes: 0, 1)"),
        (True, "label true is a boolean, not a class of cancer (classes: 0, 1)"),
        (False, "label false is a boolean, not a class of cancer"),
        (0.5, "label 0.5 is a fraction, not an integer class of cancer (classes: 0, 1)"),
        ("1", "label '1' is a string, not a class of cancer"),
        (None, "label is null, not a class of cancer"),
        ([], "label is an empty list; send one per row of that request"),
        ([[1]], "label[0] (a list of 1) is a nested list"),
        ({"a": 1}, "label (a dict of 1) is an object, not a class of cancer"),
    ],
)
async def test_a_label_that_is_not_a_class_of_the_model_is_a_400(
    cancer: Any, cancer_rows: Any, label: Any, says: str
) -> None:
    client, _ = cancer
    rid, answered = await predict(client, cancer_rows[:1])
    status, error = await feedback(client, {"id": rid, "label": label})
    assert status == 400 and says in error, error
    # the prediction stays stored: the corrected label joins
    status, joined = await feedback(client, {"id": rid, "label": answered[0]})
    assert status == 200 and joined["rows"] == 1, joined


async def test_a_boolean_among_labels_is_refused_where_it_is(cancer: Any, cancer_rows: Any) -> None:
    client, _ = cancer
    rid, answered = await predict(client, cancer_rows[:3])
    status, error = await feedback(client, {"id": rid, "label": [1, True, 0]})
    assert status == 400 and "label[1] true is a boolean" in error, error
    status, error = await feedback(client, {"id": rid, "label": [0, 1, 2.0]})
    assert status == 400 and "label[2] 2.0 is not a class of cancer" in error, error
    status, joined = await feedback(client, {"id": rid, "label": [float(a) for a in answered]})
    assert status == 200 and joined["rows"] == 3  # integral numbers are classes too


async def test_a_label_count_that_does_not_match_the_rows_says_how_many(
    cancer: Any, cancer_rows: Any
) -> None:
    client, _ = cancer
    rid, answered = await predict(client, cancer_rows[:2])
    status, error = await feedback(client, {"id": rid, "label": [0, 1, 1]})
    assert status == 400, error
    assert f"3 labels for request {rid!r}, which had 2 rows" in error, error
    status, error = await feedback(client, {"id": rid, "label": 1})
    assert status == 400 and "1 label for request" in error, error
    status, joined = await feedback(client, {"id": rid, "label": answered})
    assert status == 200 and joined["rows"] == 2


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"label": 1}, '"id" must be the id'),
        (
            {"id": 7, "label": 1},
            '"id" must be the id (a non-empty string) of an earlier inference request, not 7',
        ),
        ({"id": "", "label": 1}, '"id" must be the id'),
        ({"id": "x"}, '"label" is missing'),
        ({"id": "x", "label": 1, "value": 1}, 'as "label" or as "value", not both'),
    ],
)
async def test_a_feedback_body_without_its_parts_is_a_400(
    cancer: Any, doc: dict[str, Any], says: str
) -> None:
    client, _ = cancer
    status, error = await feedback(client, doc)
    assert status == 400 and says in error, error


@pytest.fixture(scope="module")
def prices_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prices/r1: a linear regression on 4 features, packaged by the real `package` code."""
    from sklearn.linear_model import LinearRegression

    from proxy.packaging import package_model

    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4))
    y = x @ np.array([3.0, -2.0, 1.0, 0.5])
    repo = tmp_path_factory.mktemp("prices") / "models"
    package_model(LinearRegression().fit(x, y), x, name="prices", version="r1", repo=repo)
    return repo


async def test_a_regressor_takes_finite_numbers_and_no_booleans(
    start: Any, write_config: Any, prices_repo: Path
) -> None:
    section = model_section(
        repo=prices_repo,
        name="prices",
        stable="r1",
        versions={"r1": f'{{ path = "{prices_repo}/prices/r1" }}'},
    )
    client, serving = await start(write_config(section))
    assert serving.watch.truths("prices") == Values("prices")
    resp = await client.post(
        "/v2/models/prices/infer", json=infer_body(np.ones((2, 4), dtype=np.float32))
    )
    rid = (await resp.json())["id"]
    for value, says in [
        ([1.5, True], "value[1] true is a boolean, not a finite number"),
        ("12.5", "value '12.5' is a string, not a finite number (prices is a regression model)"),
        ([1.5], "1 label for request"),
    ]:
        status, error = await feedback(client, {"id": rid, "value": value}, "prices")
        assert status == 400 and says in error, error
    status, joined = await feedback(client, {"id": rid, "value": [12.5, -3]}, "prices")
    assert status == 200 and joined["rows"] == 2, joined


def test_the_parser_without_known_classes_takes_int64_integers_only() -> None:
    unknown = Classes("remote")
    assert parse_truth([-(2**63), 2**63 - 1, 3.0], unknown).tolist() == [-(2**63), 2**63 - 1, 3]
    for bad, says in [
        (2**63, "is outside the int64 range of a class"),
        (-(2**63) - 1, "is outside the int64 range"),
        (float("nan"), "label nan is not an integer class"),
        (float("inf"), "label inf is not an integer class"),
        (True, "label true is a boolean"),
    ]:
        with pytest.raises(InvalidInputError, match=says):
            parse_truth(bad, unknown)
    with pytest.raises(InvalidInputError, match="is not a finite number"):
        parse_truth(10**400, Values("prices"))
    fb = parse_feedback({"id": "r", "value": [1, 2.5]}, Values("prices"))
    assert fb.id == "r" and fb.truth.dtype == np.float64 and fb.truth.tolist() == [1.0, 2.5]


# ---------------------------------------------------------------- booleans in numeric input


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "INT32", "INT64"])
async def test_a_boolean_in_numeric_input_is_a_400(
    cancer: Any, cancer_rows: Any, datatype: str
) -> None:
    client, _ = cancer
    doc = infer_body(cancer_rows[:2], datatype=datatype)
    values = doc["inputs"][0]["data"]
    doc["inputs"][0]["data"] = [int(v) for v in values] if datatype.startswith("INT") else values
    doc["inputs"][0]["data"][33] = True
    resp = await client.post("/v2/models/cancer/infer", json=doc)
    error = (await resp.json())["error"]
    assert resp.status == 400, error
    assert (
        f"data holds a boolean (true) at flat index 33; datatype {datatype} takes numbers" in error
    )


async def test_a_boolean_elsewhere_in_the_body_is_no_boolean_in_the_data(
    cancer: Any, cancer_rows: Any
) -> None:
    """`true` in the parameters (or a nested row) sends the data through the slow search, which
    finds no boolean there: the request is served as before."""
    client, _ = cancer
    doc = infer_body(cancer_rows[:2])
    doc["parameters"] = {"binary_data_output": False}
    doc["id"] = "true-or-false"
    tensor = doc["inputs"][0]
    tensor["data"] = [tensor["data"][:30], tensor["data"][30:]]
    resp = await client.post("/v2/models/cancer/infer", json=doc)
    assert resp.status == 200, await resp.text()
    tensor["data"][1][4] = False
    resp = await client.post("/v2/models/cancer/infer", json=doc)
    error = (await resp.json())["error"]
    assert resp.status == 400 and "a boolean (false) at flat index 34" in error, error


def test_binary_data_size_is_an_integer_not_a_boolean() -> None:
    spec = TensorSpec("input", "INT8", (-1, 1))
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1],
                    "datatype": "INT8",
                    "parameters": {"binary_data_size": True},
                }
            ]
        }
    )
    with pytest.raises(InvalidInputError, match="binary_data_size is True"):
        parse_infer_request(head + b"\x01", spec, ids=RequestIds(), header_length=len(head))


# ---------------------------------------------------------------- generated ids


async def test_a_generated_id_joins_and_a_guessed_one_is_unknown(
    cancer: Any, cancer_rows: Any
) -> None:
    client, _ = cancer
    first, _ = await predict(client, cancer_rows[:1])
    second, answered = await predict(client, cancer_rows[1:2])
    seq, _, tag = first.partition("-")
    assert second.partition("-")[0] == str(int(seq) + 1)  # the counter is readable...
    guesses = [
        f"{int(seq) + 1}-{tag}",  # ...but the next id is not the counter plus the same tag
        f"{seq}-{tag[:-1]}{'0' if tag[-1] != '0' else '1'}",  # a tag one digit off
        f"{seq}-{tag.upper()}",
        f"0{seq}-{tag}",  # the same counter written another way
        f"{seq}-{tag}0",
        seq,
    ]
    for guess in guesses:
        status, error = await feedback(client, {"id": guess, "label": 1})
        assert status == 404 and "no stored prediction" in error, (guess, error)
    status, joined = await feedback(client, {"id": second, "label": answered[0]})
    assert status == 200 and joined["model_version"] == "v1"
    status, joined = await feedback(client, {"id": first, "label": 0})
    assert status == 200  # the guesses left it stored


def test_request_ids_carry_a_tag_only_their_secret_makes() -> None:
    ids = RequestIds(secret=b"k" * 32)
    made = [ids.new() for _ in range(20)]
    assert [seq for _, seq in made] == list(range(1, 21))
    assert len({rid for rid, _ in made}) == 20
    assert all(ids.seq_of(rid) == seq for rid, seq in made)
    same = RequestIds(secret=b"k" * 32)  # the same secret: the same ids
    assert [rid for rid, _ in made] == [same.new()[0] for _ in range(20)]
    other = RequestIds()  # another process, or this one after a restart
    assert all(other.seq_of(rid) is None for rid, _ in made)
    rid, _ = other.new()
    assert ids.seq_of(rid) is None and other.seq_of(rid) == 1
    for bad in [
        "",
        "-",
        "1-",
        "1",
        "client-7",
        "²-" + "0" * 16,
        "1-" + "é" * 16,
        "1" * 20 + "-" + "0" * 16,
    ]:
        assert ids.seq_of(bad) is None, bad


def test_the_store_finds_a_generated_id_only_with_its_tag() -> None:
    ids = RequestIds()
    store = PredictionStore(4, ids)
    rid, seq = ids.new()
    store.put(rid, "v1", np.array([1]), seq)
    digits, _, tag = rid.partition("-")
    forged = f"{digits}-{'f' * 16 if tag != 'f' * 16 else 'e' * 16}"
    assert store.get(forged) is None
    got = store.pop(rid)
    assert got is not None and got.labels.tolist() == [1] and len(store) == 0
