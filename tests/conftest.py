"""Shared fixtures: demo models built once per session, configs written to tmp dirs, live servers."""

from __future__ import annotations

import random
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from aiohttp.test_utils import TestClient

from proxy.config.load import load_config
from proxy.config.schema import Config
from proxy.http.data import create_data_server
from proxy.packaging import build_demo_models, demo_data
from proxy.runtime.serving import Serving, close_serving, create_serving

BASE_CONFIG = """
[server]
host = "127.0.0.1"
port = 0
max_body_bytes = {max_body}

[limits]
max_inflight = {max_inflight}
queue_timeout_ms = 1000

[batching]
max_batch_size = 64
max_delay_ms = 1.0
"""


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/cancer/v1 and v2, built once by the real demo-models code."""
    repo = tmp_path_factory.mktemp("repo") / "models"
    build_demo_models(repo)
    return repo


@pytest.fixture(scope="session")
def cancer_rows() -> np.ndarray[Any, Any]:
    x_train, x_test, *_ = demo_data()
    return np.concatenate([x_train, x_test]).astype(np.float32)


@pytest.fixture
def repo(model_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the model repository, for tests that damage files."""
    dst = tmp_path / "models"
    shutil.copytree(model_repo, dst)
    return dst


def model_section(
    *,
    mode: str = "single",
    repo: Path,
    versions: dict[str, str] | None = None,
    extra: str = "",
    name: str = "cancer",
    stable: str = "v1",
) -> str:
    vs = versions or {
        "v1": f'{{ path = "{repo}/cancer/v1" }}',
        "v2": f'{{ path = "{repo}/cancer/v2" }}',
    }
    lines = [
        f"[models.{name}]",
        f'mode = "{mode}"',
        f'stable = "{stable}"',
        extra,
        f"[models.{name}.versions]",
    ]
    lines += [f"{k} = {v}" for k, v in vs.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Config]:
    """Write a config.toml (base + model sections) and load it through the real loader."""

    def write(
        models: str,
        *,
        max_body: int = 4 * 1024 * 1024,
        max_inflight: int = 512,
        name: str = "config.toml",
    ) -> Config:
        path = tmp_path / name
        path.write_text(BASE_CONFIG.format(max_body=max_body, max_inflight=max_inflight) + models)
        return load_config(path)

    return write


@pytest.fixture
async def start(aiohttp_raw_server: Any, aiohttp_client: Any) -> AsyncIterator[Callable[..., Any]]:
    """start(config) -> (client, serving): a real data-plane server on 127.0.0.1."""
    created: list[Serving] = []

    async def _start(config: Config, *, seed: int = 0) -> tuple[TestClient, Serving]:
        serving = await create_serving(config, rng=random.Random(seed))
        created.append(serving)
        server = await aiohttp_raw_server(create_data_server(serving).request_handler)
        client = await aiohttp_client(server)
        return client, serving

    yield _start
    for s in created:
        await close_serving(s)


def infer_body(
    rows: np.ndarray[Any, Any], *, rid: str | None = None, datatype: str = "FP32"
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "inputs": [
            {
                "name": "input",
                "shape": list(rows.shape),
                "datatype": datatype,
                "data": rows.reshape(-1).tolist(),
            }
        ]
    }
    if rid is not None:
        doc["id"] = rid
    return doc


def reference(
    repo: Path, version: str, rows: np.ndarray[Any, Any]
) -> dict[str, np.ndarray[Any, Any]]:
    """What onnxruntime itself answers for `rows`, to check the proxy against."""
    session = ort.InferenceSession(
        str(repo / "cancer" / version / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    label, probs = session.run(["label", "probabilities"], {"input": rows.astype(np.float32)})
    return {"label": label, "probabilities": probs}


@pytest.fixture
async def gated_upstream(aiohttp_raw_server: Any, write_config: Any, model_repo: Path) -> Any:
    """A second mlproxy serving cancer v2 as a remote upstream: (gated server, aiohttp server, url).
    While `gate` is clear, its infer answers wait."""
    from .upstream import start_upstream

    config = write_config(model_section(repo=model_repo, stable="v2"), name="upstream.toml")
    serving = await create_serving(config, rng=random.Random(0))
    up, server, url = await start_upstream(aiohttp_raw_server, serving)
    yield up, server, url
    up.gate.set()
    await close_serving(serving)
