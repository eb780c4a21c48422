"""Model versions on disk: sha256 check, schema check, onnxruntime session, warm-up (the one
module that imports onnxruntime; the manifest is models/manifest.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from proxy.errors import ModelLoadError
from proxy.models.manifest import MANIFEST_FILE as MANIFEST_FILE  # packaging writes it
from proxy.models.manifest import load_manifest
from proxy.protocol.codec import DTYPES, TensorSpec

MODEL_FILE = "model.onnx"
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        b = self.manifest.baseline
        if b is not None and b.n_features != self.input.shape[1]:
            raise ModelLoadError(
                f"{self.directory / 'manifest.json'}: baseline.features lists {b.n_features}"
                f" features for {self.input.shape[1]} input columns"
            )
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
        if self.manifest.feature_means is not None:
            row[0] = self.manifest.feature_means
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
