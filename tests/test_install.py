"""`pip install .` without extras, in a fresh venv: no training libraries, and it serves.

The slowest test in the suite (a venv and a wheel build, about a minute on this machine with
the local package index): it is what proves that serving needs neither scikit-learn nor skl2onnx.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import venv
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
READY_DEADLINE_S = 60.0  # from `mlproxy serve` starting to /v2/health/ready answering 200
PROBE_EVERY_S = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _source_copy(dst: Path) -> Path:
    """What a wheel is built from (pyproject, README, the package), outside the shared work tree:
    an in-tree build would leave build/ and egg-info behind in it."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "proxy", dst / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install <repo>` (no -e, no extras); returns its bin directory."""
    base = tmp_path_factory.mktemp("install")
    src = _source_copy(base / "src")
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    done = subprocess.run(
        [str(bin_dir / "pip"), "install", "--quiet", "--no-input", str(src)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return bin_dir


def _python(bin_dir: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "python"), "-c", code], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def _request(url: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, dict(resp.headers), resp.read()


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    """Poll the readiness probe until it answers 200, the server dies, or the deadline passes."""
    deadline = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < deadline:
        try:
            if _request(url)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass  # not listening yet, or not ready (503): ask again
        try:  # between probes, wait for the process to exit: a dead server fails at once
            proc.wait(timeout=PROBE_EVERY_S)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"mlproxy serve exited {proc.returncode}:\n{log.read_text()}")
    pytest.fail(f"not ready in {READY_DEADLINE_S} s:\n{log.read_text()}")


@pytest.mark.timeout(300)  # the first test also builds the venv
def test_install_without_extras_has_no_training_libraries(installed: Path, tmp_path: Path) -> None:
    done = _python(
        installed,
        "import proxy, scipy, onnxruntime; print(proxy.__file__)\n"
        "for name in ('sklearn', 'skl2onnx', 'joblib'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError:\n"
        "        print('absent', name)\n",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    where, *absent = done.stdout.splitlines()
    assert Path(where).is_relative_to(installed.parent), where  # the venv's copy, not the tree's
    assert absent == ["absent sklearn", "absent skl2onnx", "absent joblib"]


@pytest.mark.timeout(300)  # the first test also builds the venv
def test_package_and_demo_models_say_how_to_install_the_extra(
    installed: Path, tmp_path: Path
) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 2)))
    for args in (
        [
            "package",
            *("--model", str(tmp_path / "m.joblib"), "--train-data", str(tmp_path / "x.npy")),
            *("--name", "m", "--version", "v1", "--repo", str(tmp_path / "models")),
        ],
        ["demo-models", "--repo", str(tmp_path / "models")],
    ):
        done = subprocess.run(
            [str(installed / "mlproxy"), *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith(f"mlproxy {args[0]} needs the training extra"), done.stderr
        assert done.stderr.rstrip().endswith("pip install 'mlproxy[package]'"), done.stderr
    assert not (tmp_path / "models").exists()


@pytest.mark.timeout(300)  # the first test also builds the venv
def test_install_without_extras_serves_the_demo_models(
    installed: Path, tmp_path: Path, model_repo: Path, cancer_rows: np.ndarray[Any, Any]
) -> None:
    port, admin = free_port(), free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nworkers = 1\n'
        f'[admin]\nhost = "127.0.0.1"\nport = {admin}\n'
        "[limits]\nadaptive = false\n"
        '[models.cancer]\nmode = "canary"\nstable = "v1"\n'
        f'[models.cancer.versions]\nv1 = {{ path = "{model_repo}/cancer/v1" }}\n'
        f'v2 = {{ path = "{model_repo}/cancer/v2" }}\n'
        "[models.cancer.canary]\nweights = { v1 = 50, v2 = 50 }\n"
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(installed / "mlproxy"), "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}/v2/health/ready", log)
        rows = cancer_rows[:3]
        body = orjson.dumps(
            {
                "id": "install-1",
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(rows.shape),
                        "datatype": "FP32",
                        "data": rows.ravel().tolist(),
                    }
                ],
            }
        )
        status, headers, payload = _request(f"http://127.0.0.1:{port}/v2/models/cancer/infer", body)
        answer = orjson.loads(payload)
        assert status == 200 and answer["id"] == "install-1"
        assert headers["x-model-version"] == answer["model_version"] in ("v1", "v2")
        outputs = {o["name"]: o for o in answer["outputs"]}
        assert set(outputs["label"]["data"]) <= {0, 1} and len(outputs["label"]["data"]) == 3
        probabilities = np.array(outputs["probabilities"]["data"]).reshape(3, 2)
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()
