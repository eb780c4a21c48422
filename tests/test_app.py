"""The data plane over real HTTP: round trips, metadata, and every malformed request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from .helpers import infer_body, model_section, reference


@pytest.fixture
async def single(start: Any, write_config: Any, model_repo: Path) -> Any:
    client, _ = await start(write_config(model_section(repo=model_repo), max_body=200_000))
    return client


async def test_health_and_server_metadata(single: Any) -> None:
    for path, key in (("/v2/health/live", "live"), ("/v2/health/ready", "ready")):
        resp = await single.get(path)
        assert resp.status == 200
        assert (await resp.json())[key] is True
    resp = await single.get("/v2")
    assert (await resp.json())["name"] == "mlproxy"


async def test_model_metadata_comes_from_the_manifest(single: Any) -> None:
    resp = await single.get("/v2/models/cancer")
    doc = await resp.json()
    assert resp.status == 200
    assert doc["versions"] == ["v1", "v2"]
    assert doc["inputs"][0]["shape"] == [-1, 30]
    assert doc["inputs"][0]["features"][0] == "mean_radius"
    assert [o["name"] for o in doc["outputs"]] == ["label", "probabilities"]
    resp = await single.get("/v2/models/cancer/versions/v2")
    doc = await resp.json()
    assert doc["versions"] == ["v2"] and len(doc["parameters"]["sha256"]) == 64
    assert (await single.get("/v2/models/cancer/ready")).status == 200
    assert (await single.get("/v2/models/cancer/versions/v2/ready")).status == 200


@pytest.mark.parametrize("n", [1, 2, 7, 31, 64])
async def test_round_trip_matches_onnxruntime(
    single: Any, model_repo: Path, cancer_rows: Any, n: int
) -> None:
    rows = cancer_rows[n : 2 * n]
    resp = await single.post("/v2/models/cancer/infer", json=infer_body(rows, rid=f"req-{n}"))
    assert resp.status == 200
    doc = await resp.json()
    assert doc["id"] == f"req-{n}"
    assert doc["model_name"] == "cancer" and doc["model_version"] == "v1"
    assert resp.headers["x-model-version"] == "v1"
    out = {o["name"]: o for o in doc["outputs"]}
    want = reference(model_repo, "v1", rows)
    assert out["label"]["shape"] == [n] and out["label"]["datatype"] == "INT64"
    assert out["probabilities"]["shape"] == [n, 2] and out["probabilities"]["datatype"] == "FP32"
    assert out["label"]["data"] == want["label"].tolist()
    np.testing.assert_allclose(
        np.array(out["probabilities"]["data"]).reshape(n, 2), want["probabilities"], rtol=1e-6
    )


async def test_nested_data_and_other_datatypes_are_cast(
    single: Any, model_repo: Path, cancer_rows: Any
) -> None:
    rows = cancer_rows[:3]
    want = reference(model_repo, "v1", rows)["label"].tolist()
    nested = {
        "inputs": [
            {
                "name": "input",
                "shape": [3, 30],
                "datatype": "FP64",
                "data": rows.astype(np.float64).tolist(),
            }
        ]
    }
    resp = await single.post("/v2/models/cancer/infer", json=nested)
    assert resp.status == 200
    assert (await resp.json())["outputs"][0]["data"] == want
    ints = np.round(rows).astype(np.int64)
    want_int = reference(model_repo, "v1", ints.astype(np.float32))["label"].tolist()
    for dt in ("INT64", "INT32"):
        body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [3, 30],
                    "datatype": dt,
                    "data": ints.reshape(-1).tolist(),
                }
            ]
        }
        resp = await single.post("/v2/models/cancer/infer", json=body)
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["outputs"][0]["data"] == want_int


async def test_request_without_id_gets_a_fresh_one(single: Any, cancer_rows: Any) -> None:
    ids = set()
    for _ in range(3):
        resp = await single.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[:1]))
        ids.add((await resp.json())["id"])
    assert len(ids) == 3 and all(ids)


async def test_pinned_version_bypasses_the_split(
    single: Any, model_repo: Path, cancer_rows: Any
) -> None:
    rows = cancer_rows[:20]
    resp = await single.post("/v2/models/cancer/versions/v2/infer", json=infer_body(rows))
    assert resp.status == 200 and resp.headers["x-model-version"] == "v2"
    doc = await resp.json()
    np.testing.assert_allclose(
        np.array(doc["outputs"][1]["data"]).reshape(20, 2),
        reference(model_repo, "v2", rows)["probabilities"],
        rtol=1e-6,
    )


async def test_requested_outputs_and_binary_tensors(
    single: Any, model_repo: Path, cancer_rows: Any
) -> None:
    rows = cancer_rows[:4]
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [4, 30],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": rows.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    )
    resp = await single.post(
        "/v2/models/cancer/infer",
        data=head + rows.tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(head)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert resp.status == 200, await resp.text()
    body = await resp.read()
    n = int(resp.headers["Inference-Header-Content-Length"])
    doc = orjson.loads(body[:n])
    assert [o["name"] for o in doc["outputs"]] == ["probabilities"]
    probs = np.frombuffer(body[n:], dtype="<f4").reshape(4, 2)
    np.testing.assert_allclose(probs, reference(model_repo, "v1", rows)["probabilities"], rtol=1e-6)


def _row(**override: Any) -> dict[str, Any]:
    tensor = {"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [1.0] * 30}
    tensor.update(override)
    return {"inputs": [tensor]}


MALFORMED: list[tuple[str, bytes, int, str]] = [
    ("not json", b"{not json", 400, "not valid JSON"),
    ("empty body", b"", 400, "empty"),
    ("json array", b"[1, 2]", 400, "must be a JSON object"),
    ("missing inputs", b'{"id": "x"}', 400, '"inputs" must be a non-empty list'),
    ("inputs not list", b'{"inputs": 3}', 400, '"inputs" must be a non-empty list'),
    (
        "two inputs",
        orjson.dumps({"inputs": [_row()["inputs"][0]] * 2}),
        400,
        "takes one input tensor",
    ),
    ("wrong name", orjson.dumps(_row(name="x")), 400, "this model's input is 'input'"),
    (
        "missing shape",
        orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "data": [1.0] * 30}]}),
        400,
        "shape must be a list",
    ),
    (
        "negative shape",
        orjson.dumps(_row(shape=[-1, 30])),
        400,
        "shape must be a list of non-negative",
    ),
    (
        "missing datatype",
        orjson.dumps({"inputs": [{"name": "input", "shape": [1, 30], "data": [1.0] * 30}]}),
        400,
        "datatype None is not accepted",
    ),
    (
        "wrong datatype",
        orjson.dumps(_row(datatype="BYTES")),
        400,
        "datatype 'BYTES' is not accepted",
    ),
    ("bool datatype", orjson.dumps(_row(datatype="BOOL")), 400, "is not accepted"),
    ("strings as data", orjson.dumps(_row(data=["a"] * 30)), 400, "data has strings"),
    (
        "floats for INT64",
        orjson.dumps(_row(datatype="INT64", data=[1.5] * 30)),
        400,
        "needs integers",
    ),
    ("nulls in data", orjson.dumps(_row(data=[None] * 30)), 400, "mixed or null"),
    (
        "missing data",
        orjson.dumps({"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32"}]}),
        400,
        '"data" is missing',
    ),
    ("data not a list", orjson.dumps(_row(data=5)), 400, "data must be a list"),
    (
        "ragged data",
        orjson.dumps(_row(shape=[2, 30], data=[[1.0] * 30, [1.0] * 29])),
        400,
        "ragged",
    ),
    (
        "shape/data disagree",
        orjson.dumps(_row(shape=[2, 30])),
        400,
        "shape holds 60 values but data has 30",
    ),
    (
        "wrong feature count",
        orjson.dumps(_row(shape=[1, 29], data=[1.0] * 29)),
        400,
        "each row must have 30 features",
    ),
    ("one-row shape", orjson.dumps(_row(shape=[30])), 400, "send one row as shape [1, 30]"),
    ("zero rows", orjson.dumps(_row(shape=[0, 30], data=[])), 400, "holds no rows"),
    ("overflow to inf", orjson.dumps(_row(datatype="FP64", data=[1e300] * 30)), 400, "not finite"),
    (
        "int out of range",
        orjson.dumps(_row(datatype="INT8", data=[300] * 30)),
        400,
        "outside the INT8 range",
    ),
    ("id not string", orjson.dumps({**_row(), "id": 5}), 400, "id must be a string"),
    (
        "unknown output",
        orjson.dumps({**_row(), "outputs": [{"name": "nope"}]}),
        400,
        "requested output 'nope' does not exist",
    ),
    (
        "bad binary size",
        orjson.dumps(_row(parameters={"binary_data_size": 7})),
        400,
        "binary_data_size is 7",
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "words"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
async def test_malformed_request_gets_a_clear_4xx(
    single: Any, cancer_rows: Any, case: str, body: bytes, status: int, words: str
) -> None:
    resp = await single.post(
        "/v2/models/cancer/infer", data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status == status, await resp.text()
    doc = await resp.json()
    assert words in doc["error"], doc
    # and nothing else broke: the next good request is served
    resp = await single.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[:1]))
    assert resp.status == 200


async def test_nan_literal_and_body_over_limit(single: Any) -> None:
    resp = await single.post(
        "/v2/models/cancer/infer",
        data=b'{"inputs":[{"name":"input","shape":[1,1],"datatype":"FP32","data":[NaN]}]}',
    )
    assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]
    big = orjson.dumps(_row(shape=[1000, 30], data=[1.2345678] * 30_000))
    resp = await single.post("/v2/models/cancer/infer", data=big)
    assert resp.status == 413
    assert "larger than the limit of 200000 bytes" in (await resp.json())["error"]

    async def chunks() -> Any:
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    resp = await single.post("/v2/models/cancer/infer", data=chunks())
    assert resp.status == 413


async def test_unknown_model_version_route_and_method(single: Any) -> None:
    cases = [
        ("POST", "/v2/models/nope/infer", 404, "model 'nope' is not served (served: cancer)"),
        (
            "POST",
            "/v2/models/cancer/versions/v9/infer",
            404,
            "model 'cancer' has no version 'v9' (served: v1, v2)",
        ),
        ("GET", "/v2/models/cancer/versions/v9", 404, "no version 'v9'"),
        ("GET", "/v2/models/nope", 404, "not served"),
        ("GET", "/v3/anything", 404, "under /v2"),
        ("GET", "/v2/models/cancer/infer", 405, "GET is not allowed"),
        ("DELETE", "/v2/models/cancer", 405, "allowed: GET"),
        ("POST", "/v2/health/live", 405, "allowed: GET"),
    ]
    for method, path, status, words in cases:
        resp = await single.request(method, path, data=b"{}")
        assert resp.status == status, (path, await resp.text())
        assert words in (await resp.json())["error"]
    resp = await single.get("/v2/models/cancer/infer")
    assert resp.headers["Allow"] == "POST"
