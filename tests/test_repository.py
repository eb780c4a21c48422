"""Loading model versions: a damaged or mismatched version is refused with the file and reason."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from proxy.errors import ModelLoadError
from proxy.models.repository import OnnxModel


def test_good_version_loads_and_warms(model_repo: Path) -> None:
    m = OnnxModel(model_repo / "cancer" / "v1")
    assert m.input.shape == (-1, 30) and len(m.manifest.features) == 30


def test_corrupt_model_file_is_refused(repo: Path) -> None:
    path = repo / "cancer" / "v1" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        ModelLoadError, match=r"model.onnx: sha256 is [0-9a-f]{64}, the manifest says"
    ):
        OnnxModel(repo / "cancer" / "v1")


def _rewrite_manifest(directory: Path, **changes: object) -> None:
    path = directory / "manifest.json"
    doc = orjson.loads(path.read_bytes())
    doc.update(changes)
    path.write_bytes(orjson.dumps(doc))


def test_garbage_with_matching_sha_is_refused_by_onnxruntime(repo: Path) -> None:
    import hashlib

    d = repo / "cancer" / "v1"
    (d / "model.onnx").write_bytes(b"this is not an onnx model")
    doc = orjson.loads((d / "manifest.json").read_bytes())
    doc["model"]["sha256"] = hashlib.sha256(b"this is not an onnx model").hexdigest()
    (d / "manifest.json").write_bytes(orjson.dumps(doc))
    with pytest.raises(ModelLoadError, match="not a model onnxruntime can load"):
        OnnxModel(d)


def test_schema_mismatch_is_refused(repo: Path) -> None:
    d = repo / "cancer" / "v1"
    _rewrite_manifest(d, inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, 29]}])
    with pytest.raises(ModelLoadError, match=r"input is .* the manifest says .*29"):
        OnnxModel(d)
    _rewrite_manifest(
        d,
        inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, 30]}],
        outputs=[{"name": "score", "datatype": "FP32", "shape": [-1]}],
    )
    with pytest.raises(ModelLoadError, match="has no output 'score'"):
        OnnxModel(d)


def test_missing_and_unreadable_manifests(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such model directory"):
        OnnxModel(tmp_path / "nope")
    d = repo / "cancer" / "v2"
    (d / "manifest.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match=r"manifest.json: cannot be read as JSON"):
        OnnxModel(d)
    (d / "manifest.json").unlink()
    with pytest.raises(ModelLoadError, match=r"manifest.json: missing"):
        OnnxModel(d)
    (d / "manifest.json").write_text('{"name": "x"}')
    with pytest.raises(ModelLoadError, match="missing or malformed field"):
        OnnxModel(d)


def test_missing_model_file(repo: Path) -> None:
    (repo / "cancer" / "v1" / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.onnx: missing"):
        OnnxModel(repo / "cancer" / "v1")
