"""The mlproxy command as an operator runs it: check, and serve in a real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from .helpers import ROOT, free_port, http_get, serve_process, shipped_config


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=120
    )


def test_check_accepts_a_good_config(tmp_path: Path, model_repo: Path) -> None:
    done = run("check", str(shipped_config(tmp_path, model_repo)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(": ok")


def test_check_prints_each_error_as_file_key_reason(tmp_path: Path, repo: Path) -> None:
    path = shipped_config(tmp_path, repo, weights="v1 = 90, v3 = 10")
    done = run("check", str(path))
    assert done.returncode == 1
    assert (
        f"{path}:models.cancer.canary.weights: v3 is not a version of cancer (versions: v1, v2)"
        in done.stderr
    )
    # a corrupt model file is caught by check too, naming the version key and the file
    path = shipped_config(tmp_path, repo)
    (repo / "cancer" / "v2" / "model.onnx").write_bytes(b"corrupt")
    done = run("check", str(path))
    assert done.returncode == 1
    assert (
        f"{path}:models.cancer.versions.v2: {repo}/cancer/v2/model.onnx: sha256 is" in done.stderr
    )


def test_check_warns_of_settings_accepted_but_not_active_yet(
    tmp_path: Path, model_repo: Path
) -> None:
    path = shipped_config(tmp_path, model_repo, workers=0, adaptive=True)
    done = run("check", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{path}: ok"
    assert done.stderr.splitlines() == [
        f"warning: {path}:server.workers: 0 (one per core) is accepted and not active yet;"
        " this release serves with one process",
    ]  # limits.adaptive is built: true warns no more
    # what runs anyway loads silently
    done = run("check", str(shipped_config(tmp_path, model_repo, workers=1, adaptive=False)))
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def test_serve_answers_and_stops_cleanly_on_sigterm(
    tmp_path: Path, model_repo: Path, cancer_rows: object
) -> None:
    """workers = 2 is accepted and not active yet: serve warns and serves with one process."""
    port, admin = free_port(), free_port()
    path = shipped_config(tmp_path, model_repo, port=port, admin=admin, workers=2)
    with serve_process(path, port) as served:
        row = cancer_rows[0].tolist()  # type: ignore[index]
        body = orjson.dumps(
            {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": row}]}
        )
        status, headers, payload = http_get(f"http://127.0.0.1:{port}/v2/models/cancer/infer", body)
        assert status == 200 and headers["x-model-version"] in ("v1", "v2")
        assert orjson.loads(payload)["outputs"][0]["data"] in ([0], [1])
        status, _, payload = http_get(f"http://127.0.0.1:{admin}/admin/status")
        assert orjson.loads(payload)["models"]["cancer"]["mode"] == "canary"
    assert served.proc.returncode == 0, served.output
    assert "stopped" in served.output
    assert (
        f"WARNING proxy.cli: {path}:server.workers: 2 is accepted and not active yet;"
        " this release serves with one process" in served.output
    )
    assert "limits.adaptive" not in served.output


def test_locustfile_runs_against_a_live_proxy(tmp_path: Path, model_repo: Path) -> None:
    """The shipped locustfile, headless for 6 s (under heavy CPU contention locust needed more than
    3 s to start its users), gets no failures."""
    port, admin = free_port(), free_port()
    path = shipped_config(tmp_path, model_repo, port=port, admin=admin)
    locust = str(Path(sys.executable).parent / "locust")
    with serve_process(path, port):
        done = subprocess.run(
            [
                locust,
                "-f",
                str(ROOT / "bench" / "locustfile.py"),
                "--host",
                f"http://127.0.0.1:{port}",
                "--headless",
                "-u",
                "10",
                "-r",
                "10",
                "-t",
                "6s",
                "--only-summary",
                "--csv",
                str(tmp_path / "run"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    stats = (tmp_path / "run_stats.csv").read_text().splitlines()
    total = next(line for line in stats if ",Aggregated," in line).split(",")
    assert int(total[2]) > 0 and int(total[3]) == 0, total  # requests, failures
