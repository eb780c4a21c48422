"""An unmodified Open Inference Protocol client (Triton's tritonclient.http) works against mlproxy."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.http as httpclient

from .helpers import model_section, reference


def _triton_calls(url: str, rows: np.ndarray[Any, Any]) -> dict[str, Any]:
    client = httpclient.InferenceServerClient(url=url)
    try:
        result: dict[str, Any] = {
            "live": client.is_server_live(),
            "ready": client.is_model_ready("cancer"),
            "meta": client.get_model_metadata("cancer"),
        }
        inp = httpclient.InferInput("input", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows, binary_data=True)
        res = client.infer("cancer", [inp], request_id="triton-1")  # binary outputs by default
        result["label"] = res.as_numpy("label")
        result["probabilities"] = res.as_numpy("probabilities")
        result["id"] = res.get_response()["id"]
        inp_json = httpclient.InferInput("input", list(rows.shape), "FP32")
        inp_json.set_data_from_numpy(rows, binary_data=False)
        out = httpclient.InferRequestedOutput("probabilities", binary_data=False)
        res = client.infer("cancer", [inp_json], outputs=[out], model_version="v2")
        result["v2_probabilities"] = res.as_numpy("probabilities")
        return result
    finally:
        client.close()


async def test_tritonclient_http_unchanged(
    start: Any, write_config: Any, model_repo: Path, cancer_rows: Any
) -> None:
    client, _ = await start(write_config(model_section(repo=model_repo)))
    rows = np.ascontiguousarray(cancer_rows[:8])
    url = f"127.0.0.1:{client.server.port}"
    got = await asyncio.get_running_loop().run_in_executor(None, _triton_calls, url, rows)
    assert got["live"] and got["ready"]
    assert got["meta"]["inputs"][0]["shape"] == [-1, 30]
    assert got["id"] == "triton-1"
    want = reference(model_repo, "v1", rows)
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=1e-6)
    np.testing.assert_allclose(
        got["v2_probabilities"], reference(model_repo, "v2", rows)["probabilities"], rtol=1e-6
    )
