"""Model versions on disk: manifest, sha256 check, schema check, onnxruntime session, warm-up."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson

from proxy.errors import ModelLoadError
from proxy.protocol.codec import DTYPES, TensorSpec, parse_tensor_specs

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
ORT_TYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int16)": "INT16",
    "tensor(int8)": "INT8",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
}


@dataclass(frozen=True, slots=True)
class Manifest:
    """The parts of manifest.json the server relies on; `raw` keeps the whole document."""

    name: str
    version: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    features: tuple[str, ...]
    task: str
    raw: dict[str, Any]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    try:
        inputs = parse_tensor_specs(raw["inputs"], "inputs")
        outputs = parse_tensor_specs(raw["outputs"], "outputs")
        features = tuple(raw["inputs"][0].get("features") or ())
        manifest = Manifest(
            name=str(raw["name"]),
            version=str(raw["version"]),
            sha256=str(raw["model"]["sha256"]),
            inputs=inputs,
            outputs=outputs,
            features=features,
            task=str(raw.get("task", "classification")),
            raw=raw,
        )
    except (KeyError, TypeError, IndexError) as exc:
        raise ModelLoadError(f"{path}: missing or malformed field {exc}") from None
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    if len(inputs) != 1 or len(inputs[0].shape) != 2 or inputs[0].shape[1] <= 0:
        raise ModelLoadError(f"{path}: inputs must be one tensor of shape [-1, n_features]")
    if features and len(features) != inputs[0].shape[1]:
        raise ModelLoadError(
            f"{path}: lists {len(features)} feature names for {inputs[0].shape[1]} input columns"
        )
    return manifest


def _ort_shape(shape: list[Any]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else -1 for d in shape)


class OnnxModel:
    """One model version loaded in onnxruntime; `run` is thread-safe and blocking."""

    def __init__(self, directory: Path, *, intra_op_threads: int = 1) -> None:
        self.directory = directory
        self.manifest = load_manifest(directory)
        model_path = directory / MODEL_FILE
        if not model_path.is_file():
            raise ModelLoadError(f"{model_path}: missing")
        actual = sha256_file(model_path)
        if actual != self.manifest.sha256:
            raise ModelLoadError(
                f"{model_path}: sha256 is {actual}, the manifest says {self.manifest.sha256}"
                " (the file changed or is corrupt; refusing to serve it)"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own types for every parse failure
            raise ModelLoadError(f"{model_path}: not a model onnxruntime can load: {exc}") from None
        self.input = self.manifest.inputs[0]
        self.outputs = self.manifest.outputs
        self._check_schema(model_path)
        self._output_names = [o.name for o in self.outputs]
        self._dtype = DTYPES[self.input.datatype]
        self.warm_up()

    def _check_schema(self, model_path: Path) -> None:
        s_inputs = self.session.get_inputs()
        if len(s_inputs) != 1:
            raise ModelLoadError(
                f"{model_path}: has {len(s_inputs)} inputs; mlproxy serves one-input models"
            )
        got = TensorSpec(
            s_inputs[0].name,
            ORT_TYPES.get(s_inputs[0].type, s_inputs[0].type),
            _ort_shape(s_inputs[0].shape),
        )
        if got != self.input:
            raise ModelLoadError(
                f"{model_path}: input is {got.to_json()}, the manifest says {self.input.to_json()}"
            )
        s_outputs = {o.name: o for o in self.session.get_outputs()}
        for spec in self.outputs:
            o = s_outputs.get(spec.name)
            if o is None:
                raise ModelLoadError(
                    f"{model_path}: has no output {spec.name!r} (outputs: {', '.join(s_outputs)})"
                )
            if ORT_TYPES.get(o.type) != spec.datatype:
                raise ModelLoadError(
                    f"{model_path}: output {spec.name!r} is {o.type}, the manifest says {spec.datatype}"
                )

    def run(self, x: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
        results = self.session.run(self._output_names, {self.input.name: x})
        return dict(zip(self._output_names, results, strict=True))

    def warm_up(self) -> None:
        """Run one real inference so the first request does not pay for lazy initialisation."""
        n = self.input.shape[1]
        row = np.zeros((1, n), dtype=self._dtype)
        baseline = self.manifest.raw.get("baseline", {}).get("features")
        if isinstance(baseline, list) and len(baseline) == n:
            row[0] = [f.get("mean", 0.0) for f in baseline]
        try:
            out = self.run(row)
        except Exception as exc:
            raise ModelLoadError(
                f"{self.directory / MODEL_FILE}: warm-up inference failed: {exc}"
            ) from None
        for spec in self.outputs:
            if out[spec.name].shape[0] != 1:
                raise ModelLoadError(
                    f"{self.directory / MODEL_FILE}: output {spec.name!r} has {out[spec.name].shape[0]}"
                    " rows for 1 input row"
                )
