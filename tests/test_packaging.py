"""demo-models and package: deterministic output, manifest contents, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import orjson
from sklearn.linear_model import LinearRegression, LogisticRegression

from proxy.models.repository import OnnxModel, sha256_file


def _mlproxy(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_demo_models_are_byte_identical_across_runs(tmp_path: Path, model_repo: Path) -> None:
    done = _mlproxy("demo-models", "--repo", str(tmp_path / "a"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for v in ("v1", "v2"):
        for f in ("model.onnx", "manifest.json"):
            # a separate process and the session's in-process build: same bytes
            assert (tmp_path / "a" / "cancer" / v / f).read_bytes() == (
                model_repo / "cancer" / v / f
            ).read_bytes(), (v, f)


def test_manifest_ties_model_data_and_code(model_repo: Path) -> None:
    doc = orjson.loads((model_repo / "cancer" / "v1" / "manifest.json").read_bytes())
    assert doc["model"]["sha256"] == sha256_file(model_repo / "cancer" / "v1" / "model.onnx")
    assert doc["training_data"]["rows"] == 455 and len(doc["training_data"]["sha256"]) == 64
    assert set(doc["code"]["libraries"]) >= {"scikit-learn", "skl2onnx", "onnxruntime"}
    feats = doc["baseline"]["features"]
    assert len(feats) == 30 and feats[0]["name"] == "mean_radius"
    for f in feats:
        assert len(f["edges"]) == len(f["fractions"]) + 1
        assert abs(sum(f["fractions"]) - 1.0) < 1e-9
    out = doc["baseline"]["outputs"]
    assert abs(sum(out["label"]["fractions"]) - 1.0) < 1e-9
    assert len(out["probabilities"]["fractions"]) == 2
    assert doc["metrics"]["holdout"]["accuracy"] > 0.9
    assert doc["outputs"][1] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}


def test_package_cli_for_a_users_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    clf = LogisticRegression().fit(x, y)
    joblib.dump(clf, tmp_path / "clf.joblib")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    done = _mlproxy(
        "package",
        "--model",
        "clf.joblib",
        "--train-data",
        "x.npy",
        "--name",
        "toy",
        "--version",
        "v7",
        "--repo",
        "repo",
        "--features",
        "a,b,c,d",
        "--holdout-data",
        "x.npy",
        "--holdout-labels",
        "y.npy",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    model = OnnxModel(tmp_path / "repo" / "toy" / "v7")
    assert model.manifest.features == ("a", "b", "c", "d")
    assert model.manifest.raw["metrics"]["holdout"]["accuracy"] > 0.9
    out = model.run(x[:5].astype(np.float32))
    assert out["label"].tolist() == clf.predict(x[:50]).tolist()[:5]
    np.testing.assert_allclose(out["probabilities"], clf.predict_proba(x[:5]), atol=1e-5)

    joblib.dump(LinearRegression().fit(x, x[:, 0] * 2), tmp_path / "reg.joblib")
    done = _mlproxy(
        "package",
        "--model",
        "reg.joblib",
        "--train-data",
        "x.npy",
        "--name",
        "toy",
        "--version",
        "r1",
        "--repo",
        "repo",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    reg = OnnxModel(tmp_path / "repo" / "toy" / "r1")
    assert reg.manifest.task == "regression"
    np.testing.assert_allclose(
        reg.run(x[:3].astype(np.float32))["variable"].reshape(-1), x[:3, 0] * 2, rtol=1e-4
    )


def test_package_cli_errors_are_clear(tmp_path: Path) -> None:
    done = _mlproxy(
        "package",
        "--model",
        "missing.joblib",
        "--train-data",
        "x.npy",
        "--name",
        "n",
        "--version",
        "v",
        cwd=tmp_path,
    )
    assert done.returncode == 1 and "missing.joblib" in done.stderr
    np.save(tmp_path / "bad.npy", np.array([[1.0, np.nan], [2.0, 3.0]]))
    joblib.dump(LogisticRegression().fit([[0, 0], [1, 1]], [0, 1]), tmp_path / "m.joblib")
    done = _mlproxy(
        "package",
        "--model",
        "m.joblib",
        "--train-data",
        "bad.npy",
        "--name",
        "n",
        "--version",
        "v",
        cwd=tmp_path,
    )
    assert done.returncode == 1 and "NaN or infinite" in done.stderr
