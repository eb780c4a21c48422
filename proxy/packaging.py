"""sklearn model -> models/<name>/<version>/model.onnx + manifest.json with baseline statistics."""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from proxy.models.repository import MANIFEST_FILE, MODEL_FILE, sha256_file
from proxy.runtime.state import write_atomic

FEATURE_BINS = 10  # quantile bins per feature in the baseline
PROBABILITY_BINS = 10  # fixed-width bins over [0, 1] for predicted probabilities
DEMO_SEED = 0
LIBRARIES = ("scikit-learn", "skl2onnx", "onnx", "onnxruntime", "numpy")


def fingerprint(x: np.ndarray[Any, Any]) -> dict[str, Any]:
    """sha256 and size of training data, independent of how it was stored."""
    data = np.ascontiguousarray(x, dtype="<f8")
    digest = hashlib.sha256(str(data.shape).encode() + data.tobytes()).hexdigest()
    return {"sha256": digest, "rows": int(data.shape[0]), "columns": int(data.shape[1])}


def feature_baseline(x: np.ndarray[Any, Any], names: list[str]) -> list[dict[str, Any]]:
    """Per feature: quantile bin edges and the fraction of training rows in each bin.

    Edges run from the training minimum to its maximum; a live value is put in bin
    searchsorted(edges[1:-1], v, side="right"), and values outside [min, max] go to the
    under/overflow bins the monitor adds, whose baseline fraction is 0.
    """
    out = []
    for j, name in enumerate(names):
        col = x[:, j].astype(np.float64)
        edges = np.unique(np.quantile(col, np.linspace(0.0, 1.0, FEATURE_BINS + 1)))
        if edges.size < 2:
            edges = np.array([edges[0], edges[0]])
        idx = np.searchsorted(edges[1:-1], col, side="right")
        counts = np.bincount(idx, minlength=edges.size - 1)
        out.append(
            {
                "name": name,
                "edges": [float(e) for e in edges],
                "fractions": [float(c) for c in counts / col.size],
                "min": float(col.min()),
                "max": float(col.max()),
                "mean": float(col.mean()),
                "std": float(col.std()),
            }
        )
    return out


def output_baseline(
    outputs: dict[str, np.ndarray[Any, Any]], classes: list[Any] | None
) -> dict[str, Any]:
    """The model's own output distribution on its training rows (label-free drift compares to it)."""
    result: dict[str, Any] = {}
    edges = np.linspace(0.0, 1.0, PROBABILITY_BINS + 1)
    if classes is not None:
        labels = outputs["label"]
        result["label"] = {
            "classes": classes,
            "fractions": [float(np.mean(labels == c)) for c in classes],
        }
        probs = outputs["probabilities"]
        result["probabilities"] = {
            "edges": [float(e) for e in edges],
            "fractions": [
                [
                    float(f)
                    for f in np.bincount(
                        np.clip(
                            np.searchsorted(edges[1:-1], probs[:, k], side="right"),
                            0,
                            PROBABILITY_BINS - 1,
                        ),
                        minlength=PROBABILITY_BINS,
                    )
                    / probs.shape[0]
                ]
                for k in range(probs.shape[1])
            ],
        }
    else:
        values = outputs["variable"].reshape(-1).astype(np.float64)
        result["variable"] = feature_baseline(values.reshape(-1, 1), ["variable"])[0]
    return result


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _versions() -> dict[str, str]:
    found = {}
    for lib in LIBRARIES:
        try:
            found[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def convert(model: Any, n_features: int) -> bytes:
    """skl2onnx conversion: one FP32 input named "input", classifier probabilities as a tensor."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier

    options = {id(model): {"zipmap": False}} if is_classifier(model) else None
    onx = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, n_features]))],
        options=options,
        name="mlproxy",  # the default graph name is a random uuid: it would break byte-identical builds
    )
    names = [o.name for o in onx.graph.output]
    if is_classifier(model):
        if names != ["label", "probabilities"]:
            raise ValueError(f"unexpected classifier outputs {names}")
    elif names != ["variable"]:
        raise ValueError(f"unexpected regressor outputs {names}")
    data: bytes = onx.SerializeToString()
    return data


def package_model(
    model: Any,
    x_train: np.ndarray[Any, Any],
    *,
    name: str,
    version: str,
    repo: Path,
    feature_names: list[str] | None = None,
    holdout: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None = None,
    description: str = "",
) -> Path:
    """Convert a fitted sklearn model and write model.onnx + manifest.json; returns the directory."""
    from sklearn.base import is_classifier

    x_train, names = _training_data(x_train, feature_names)
    blob = convert(model, len(names))
    session = _session(blob)
    outputs = _infer(session, x_train)
    classifier = is_classifier(model)
    classes = (
        [c.item() if hasattr(c, "item") else c for c in model.classes_] if classifier else None
    )
    metrics: dict[str, Any] = {}
    if holdout is not None:
        hx, hy = holdout
        metrics = _holdout_metrics(_infer(session, hx), hy, classifier=classifier)
    manifest = _manifest(
        model,
        blob=blob,
        x_train=x_train,
        names=names,
        outputs=outputs,
        classes=classes,
        metrics=metrics,
        name=name,
        version=version,
        description=description,
    )
    return _write(repo / name / version, blob, manifest)


def _manifest(
    model: Any,
    *,
    blob: bytes,
    x_train: np.ndarray[Any, Any],
    names: list[str],
    outputs: dict[str, np.ndarray[Any, Any]],
    classes: list[Any] | None,
    metrics: dict[str, Any],
    name: str,
    version: str,
    description: str,
) -> dict[str, Any]:
    """What the version's manifest.json says: the model file, its inputs and outputs, the
    training data's fingerprint and baseline, the code that built it, its holdout metrics."""
    return {
        "format_version": 1,
        "name": name,
        "version": version,
        "description": description,
        "task": "regression" if classes is None else "classification",
        "classes": classes,
        "model": {
            "file": MODEL_FILE,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob),
            "estimator": repr(model),
        },
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, len(names)], "features": names}
        ],
        "outputs": _outputs_spec(classes),
        "training_data": fingerprint(x_train),
        "code": {"git_commit": _git_commit(), "libraries": _versions()},
        "baseline": {
            "features": feature_baseline(x_train, names),
            "outputs": output_baseline(outputs, classes),
        },
        "metrics": {"holdout": metrics},
    }


def _training_data(
    x_train: np.ndarray[Any, Any], feature_names: list[str] | None
) -> tuple[np.ndarray[Any, Any], list[str]]:
    """The training rows as an array, checked, and a name per column (f0, f1, ... by default)."""
    x_train = np.asarray(x_train)
    if x_train.ndim != 2 or x_train.shape[0] < 2:
        raise ValueError(f"training data must be a 2-D array with rows, not shape {x_train.shape}")
    if not np.isfinite(x_train).all():
        raise ValueError("training data holds NaN or infinite values")
    n = int(x_train.shape[1])
    names = feature_names or [f"f{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} feature names for {n} columns")
    return x_train, names


def _session(blob: bytes) -> Any:
    """An onnxruntime session of the converted model (only to compute its outputs here)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(blob, sess_options=options, providers=["CPUExecutionProvider"])


def _infer(session: Any, x: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
    """Every output of the converted model on rows `x` (as float32, the model's input type)."""
    out_names = [o.name for o in session.get_outputs()]
    results = session.run(out_names, {"input": x.astype(np.float32)})
    return dict(zip(out_names, results, strict=True))


def _outputs_spec(classes: list[Any] | None) -> list[dict[str, Any]]:
    """The manifest's outputs: label and probabilities of a classifier, a regressor's variable."""
    if classes is not None:
        return [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(classes)]},
        ]
    return [{"name": "variable", "datatype": "FP32", "shape": [-1, 1]}]


def _holdout_metrics(
    pred: dict[str, np.ndarray[Any, Any]], hy: np.ndarray[Any, Any], *, classifier: bool
) -> dict[str, Any]:
    """Accuracy (classifier) or mean absolute error (regressor) on the holdout rows."""
    if classifier:
        return {"accuracy": float(np.mean(pred["label"] == hy)), "rows": int(hy.shape[0])}
    return {
        "mae": float(np.mean(np.abs(pred["variable"].reshape(-1) - hy))),
        "rows": int(hy.shape[0]),
    }


def _write(directory: Path, blob: bytes, manifest: dict[str, Any]) -> Path:
    """model.onnx and manifest.json (sorted keys, so builds compare byte for byte) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / MODEL_FILE, blob)
    write_atomic(
        directory / MANIFEST_FILE,
        orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n",
    )
    assert sha256_file(directory / MODEL_FILE) == manifest["model"]["sha256"]
    return directory


def demo_data() -> tuple[
    np.ndarray[Any, Any],
    np.ndarray[Any, Any],
    np.ndarray[Any, Any],
    np.ndarray[Any, Any],
    list[str],
]:
    """The bundled breast-cancer data, split 80/20 with a fixed seed (stratified)."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.2, random_state=DEMO_SEED, stratify=data.target
    )
    names = [str(n).replace(" ", "_") for n in data.feature_names]
    return x_train, x_test, y_train, y_test, names


def build_demo_models(repo: Path) -> list[Path]:
    """Train and package cancer/v1 (scaled logistic regression) and cancer/v2 (random forest)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, y_train, y_test, names = demo_data()
    v1 = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=DEMO_SEED))
    v2 = RandomForestClassifier(n_estimators=30, max_depth=6, random_state=DEMO_SEED, n_jobs=1)
    built = []
    for version, est, text in (
        ("v1", v1, "StandardScaler + LogisticRegression on breast-cancer (sklearn bundled data)"),
        ("v2", v2, "RandomForest (30 trees, depth 6) on breast-cancer (sklearn bundled data)"),
    ):
        est.fit(x_train, y_train)
        built.append(
            package_model(
                est,
                x_train,
                name="cancer",
                version=version,
                repo=repo,
                feature_names=names,
                holdout=(x_test, y_test),
                description=text,
            )
        )
    return built
