"""The mlproxy command as an operator runs it: check, and serve in a real process."""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write(
    tmp_path: Path,
    model_repo: Path,
    *,
    port: int = 0,
    admin: int = 0,
    weights: str = "v1 = 90, v2 = 10",
    workers: int = 1,
    adaptive: bool = True,
) -> Path:
    """The shipped config.toml with the models, ports and these values put in."""
    text = (ROOT / "config.toml").read_text()
    for key, shipped, value in (
        ("workers", "1", str(workers)),
        ("adaptive", "true", str(adaptive).lower()),
    ):
        assert f"\n{key} = {shipped} " in text, f"the shipped config.toml changed its {key} line"
        text = text.replace(f"\n{key} = {shipped} ", f"\n{key} = {value} ")
    text = text.replace('"models/cancer/', f'"{model_repo}/cancer/')
    text = text.replace("port = 8080", f"port = {port}").replace("port = 8081", f"port = {admin}")
    text = text.replace("weights = { v1 = 90, v2 = 10 }", f"weights = {{ {weights} }}")
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=120
    )


def test_check_accepts_a_good_config(tmp_path: Path, model_repo: Path) -> None:
    done = run("check", str(write(tmp_path, model_repo)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(": ok")


def test_check_prints_each_error_as_file_key_reason(tmp_path: Path, repo: Path) -> None:
    path = write(tmp_path, repo, weights="v1 = 90, v3 = 10")
    done = run("check", str(path))
    assert done.returncode == 1
    assert (
        f"{path}:models.cancer.canary.weights: v3 is not a version of cancer (versions: v1, v2)"
        in done.stderr
    )
    # a corrupt model file is caught by check too, naming the version key and the file
    path = write(tmp_path, repo)
    (repo / "cancer" / "v2" / "model.onnx").write_bytes(b"corrupt")
    done = run("check", str(path))
    assert done.returncode == 1
    assert (
        f"{path}:models.cancer.versions.v2: {repo}/cancer/v2/model.onnx: sha256 is" in done.stderr
    )


def test_check_warns_of_settings_accepted_but_not_active_yet(
    tmp_path: Path, model_repo: Path
) -> None:
    path = write(tmp_path, model_repo, workers=0, adaptive=True)
    done = run("check", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{path}: ok"
    assert done.stderr.splitlines() == [
        f"warning: {path}:server.workers: 0 (one per core) is accepted and not active yet;"
        " this release serves with one process",
        f"warning: {path}:limits.adaptive: true is accepted and not active yet; the in-flight"
        " limit stays at limits.max_inflight (512)",
    ]
    # what runs anyway loads silently
    done = run("check", str(write(tmp_path, model_repo, workers=1, adaptive=False)))
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def _get(url: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, dict(resp.headers), resp.read()


@dataclass
class Served:
    """A running `mlproxy serve`: its log lines arrive in `lines` as the process writes them."""

    proc: subprocess.Popen[str]
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.seen)

    def wait_for_line(self, text: str, timeout: float = 30.0) -> str:
        """Block until the process logs a line containing `text` (or fail at the deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                pytest.fail(f"no log line with {text!r} in {timeout} s; log so far:\n{self.output}")
            if line is None:
                pytest.fail(f"server exited before logging {text!r}:\n{self.output}")
            self.seen.append(line)
            if text in line:
                return line


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)
    lines.put(None)


@contextlib.contextmanager
def serve_process(path: Path, port: int) -> Iterator[Served]:
    """`mlproxy serve` in a real process, ready (it logged "serving") when the block starts,
    SIGTERMed after it; `output` then holds its whole log."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    served = Served(proc)
    reader = threading.Thread(target=_pump, args=(proc, served.lines), daemon=True)
    reader.start()
    try:
        served.wait_for_line(f"serving {path} on http://127.0.0.1:{port}")
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        while not served.lines.empty():
            line = served.lines.get()
            if line is not None:
                served.seen.append(line)


def test_serve_answers_and_stops_cleanly_on_sigterm(
    tmp_path: Path, model_repo: Path, cancer_rows: object
) -> None:
    """workers = 2 is accepted and not active yet: serve warns and serves with one process."""
    port, admin = free_port(), free_port()
    path = write(tmp_path, model_repo, port=port, admin=admin, workers=2)
    with serve_process(path, port) as served:
        row = cancer_rows[0].tolist()  # type: ignore[index]
        body = orjson.dumps(
            {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": row}]}
        )
        status, headers, payload = _get(f"http://127.0.0.1:{port}/v2/models/cancer/infer", body)
        assert status == 200 and headers["x-model-version"] in ("v1", "v2")
        assert orjson.loads(payload)["outputs"][0]["data"] in ([0], [1])
        status, _, payload = _get(f"http://127.0.0.1:{admin}/admin/status")
        assert orjson.loads(payload)["models"]["cancer"]["mode"] == "canary"
    assert served.proc.returncode == 0, served.output
    assert "stopped" in served.output
    assert (
        f"WARNING proxy.cli: {path}:server.workers: 2 is accepted and not active yet;"
        " this release serves with one process" in served.output
    )
    assert f"WARNING proxy.cli: {path}:limits.adaptive: true is accepted" in served.output


def test_locustfile_runs_against_a_live_proxy(tmp_path: Path, model_repo: Path) -> None:
    """The shipped locustfile, headless for 6 s (under heavy CPU contention locust needed more than
    3 s to start its users), gets no failures."""
    port, admin = free_port(), free_port()
    path = write(tmp_path, model_repo, port=port, admin=admin)
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
