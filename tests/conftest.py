"""Shared fixtures: demo models built once per session, configs written to tmp dirs, live servers."""

from __future__ import annotations

import random
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from proxy.config.load import load_config
from proxy.config.schema import Config
from proxy.http.data import create_data_server
from proxy.packaging import build_demo_models, demo_data
from proxy.runtime.serving import Serving, close_serving, create_serving

# infer_body: test_fallback.py and test_readers.py still import it from here; drop it once they
# import from .helpers
from .helpers import BASE_CONFIG, DataTestServer, model_section


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
async def start(aiohttp_client: Any) -> AsyncIterator[Callable[..., Any]]:
    """start(config) -> (client, serving): a real data-plane server on 127.0.0.1, with the
    data plane's own connection protocol."""
    created: list[Serving] = []

    async def _start(config: Config, *, seed: int = 0) -> tuple[TestClient, Serving]:
        serving = await create_serving(config, rng=random.Random(seed))
        created.append(serving)
        server = DataTestServer(create_data_server(serving))
        client = await aiohttp_client(server)
        return client, serving

    yield _start
    for s in created:
        await close_serving(s)


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
