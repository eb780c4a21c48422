"""Model versions built to misbehave: one answers wrongly, one fails on real traffic."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import orjson
from onnx import TensorProto, helper
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from proxy.packaging import demo_data, package_model


def build_wrong(repo: Path, version: str = "wrong") -> Path:
    """A well-formed model trained on flipped labels: every answer it gives is the wrong one."""
    x_train, _, y_train, _, names = demo_data()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0))
    model.fit(x_train, 1 - y_train)
    return package_model(
        model, x_train, name="cancer", version=version, repo=repo, feature_names=names
    )


def build_broken(repo: Path, version: str = "broken") -> Path:
    """Loads and warms up (on an all-zero row) but fails on any real row: it indexes a 2-element
    table with the first feature (mean radius, 7..28), which onnxruntime rejects as out of bounds."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 30])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, [None])
    probs = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])
    nodes = [
        helper.make_node(
            "Constant", [], ["starts"], value=helper.make_tensor("s", TensorProto.INT64, [1], [0])
        ),
        helper.make_node(
            "Constant", [], ["ends"], value=helper.make_tensor("e", TensorProto.INT64, [1], [1])
        ),
        helper.make_node(
            "Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])
        ),
        helper.make_node(
            "Constant",
            [],
            ["table"],
            value=helper.make_tensor("t", TensorProto.FLOAT, [2], [0.5, 0.5]),
        ),
        helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["first"]),
        helper.make_node("Cast", ["first"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["half"], axis=0),
        helper.make_node("Concat", ["half", "half"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(nodes, "broken", [x], [label, probs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    blob = model.SerializeToString()
    directory = repo / "cancer" / version
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(blob)
    manifest = orjson.loads((repo / "cancer" / "v1" / "manifest.json").read_bytes())
    manifest["version"] = version
    manifest["model"]["sha256"] = hashlib.sha256(blob).hexdigest()
    del manifest["baseline"]  # warm-up then runs an all-zero row, which this model survives
    (directory / "manifest.json").write_bytes(orjson.dumps(manifest))
    return directory
