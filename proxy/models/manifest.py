"""manifest.json, typed: what a version is (schema, sha256), what it was trained on (baseline),
how well it did (holdout metrics). Parsed once, when the version is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from proxy.errors import ModelLoadError
from proxy.monitoring.baseline import Baseline
from proxy.protocol.codec import TensorSpec, parse_tensor_specs

MANIFEST_FILE = "manifest.json"


class Task(StrEnum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"


@dataclass(frozen=True, slots=True)
class Manifest:
    """The parts of manifest.json the server relies on; `raw` keeps the whole document."""

    name: str
    version: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    features: tuple[str, ...]
    task: Task
    baseline: Baseline | None  # None: the manifest has no baseline statistics to watch against
    feature_means: tuple[float, ...] | None  # the training rows' means (the warm-up row)
    feature_edges: tuple[tuple[float, ...], ...]  # the baseline's bin edges per feature
    metrics: dict[str, Any]  # as written by packaging (holdout accuracy or mae)
    training_data: dict[str, Any] | None
    raw: dict[str, Any]

    @property
    def regression(self) -> bool:
        return self.task is Task.REGRESSION

    @property
    def holdout_accuracy(self) -> float | None:
        return _metric(self.metrics, "accuracy")

    @property
    def holdout_mae(self) -> float | None:
        return _metric(self.metrics, "mae")


def _metric(metrics: dict[str, Any], name: str) -> float | None:
    holdout = metrics.get("holdout")
    value = holdout.get(name) if isinstance(holdout, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def parse_manifest(raw: Any, where: str) -> Manifest:
    """Check a manifest document; ModelLoadError names `where` and the field that is wrong."""
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{where}: is not a JSON object")
    try:
        inputs = parse_tensor_specs(raw["inputs"], "inputs")
        outputs = parse_tensor_specs(raw["outputs"], "outputs")
        features = tuple(str(f) for f in raw["inputs"][0].get("features") or ())
        name, version, sha256 = str(raw["name"]), str(raw["version"]), str(raw["model"]["sha256"])
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ModelLoadError(f"{where}: missing or malformed field {exc}") from None
    except ValueError as exc:
        raise ModelLoadError(f"{where}: {exc}") from None
    if len(inputs) != 1 or len(inputs[0].shape) != 2 or inputs[0].shape[1] <= 0:
        raise ModelLoadError(f"{where}: inputs must be one tensor of shape [-1, n_features]")
    n = inputs[0].shape[1]
    if features and len(features) != n:
        raise ModelLoadError(f"{where}: lists {len(features)} feature names for {n} input columns")
    training = raw.get("training_data")
    return Manifest(
        name=name,
        version=version,
        sha256=sha256,
        inputs=inputs,
        outputs=outputs,
        features=features,
        training_data=training if isinstance(training, dict) else None,
        **_watched(raw, where),
    )


def parse_baseline_manifest(raw: Any, where: str, n_features: int) -> Manifest:
    """A remote version's manifest: only what it is watched against (baseline, task, metrics)
    is read; its schema is the remote server's (n_features > 0: the columns it takes)."""
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{where}: is not a JSON object")
    feats = (raw.get("baseline") or {}).get("features")
    if not isinstance(feats, list) or not feats:
        raise ModelLoadError(f"{where}: has no baseline.features (write it with `mlproxy package`)")
    if n_features > 0 and len(feats) != n_features:
        raise ModelLoadError(
            f"{where}: its baseline has {len(feats)} features, the remote model takes {n_features}"
        )
    return Manifest(
        name=str(raw.get("name", "")),
        version=str(raw.get("version", "")),
        sha256=str((raw.get("model") or {}).get("sha256", "")),
        inputs=(),
        outputs=(),
        features=tuple(str(f.get("name", "")) for f in feats if isinstance(f, dict)),
        training_data=None,
        **_watched(raw, where),
    )


def _watched(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """What a version is watched against, the same for local and remote manifests: task,
    baseline (with the training means and bin edges) and holdout metrics."""
    try:
        task = Task(raw.get("task", Task.CLASSIFICATION))
    except ValueError as exc:
        raise ModelLoadError(f"{where}: {exc}") from None
    baseline, means, edges = _parse_baseline(raw, where)
    metrics = raw.get("metrics")
    return {
        "task": task,
        "baseline": baseline,
        "feature_means": means,
        "feature_edges": edges,
        "metrics": metrics if isinstance(metrics, dict) else {},
        "raw": raw,
    }


def _parse_baseline(
    raw: dict[str, Any], where: str
) -> tuple[Baseline | None, tuple[float, ...] | None, tuple[tuple[float, ...], ...]]:
    feats = (raw.get("baseline") or {}).get("features")
    if not feats:
        return None, None, ()
    if not isinstance(feats, list):
        raise ModelLoadError(f"{where}: baseline.features must be a list of features")
    try:
        baseline = Baseline.from_manifest(raw)
        means = tuple(float(f.get("mean", 0.0)) for f in feats)
        edges = tuple(tuple(float(e) for e in f["edges"]) for f in feats)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ModelLoadError(f"{where}: malformed baseline ({type(exc).__name__}: {exc})") from None
    if baseline is not None and not np.isfinite(baseline.fractions).all():
        raise ModelLoadError(f"{where}: baseline fractions must be finite numbers")
    return baseline, means, edges


def load_manifest(directory: Path) -> Manifest:
    """Read and check `<directory>/manifest.json`; ModelLoadError names the file and the problem."""
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: no such model directory")
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing (every model version needs a manifest)") from None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot be read as JSON: {exc}") from None
    return parse_manifest(raw, str(path))
