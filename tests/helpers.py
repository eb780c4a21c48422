"""What test modules share besides fixtures: config snippets, request bodies, reference answers,
the exported metric names, and running `mlproxy serve` as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer

ROOT = Path(__file__).resolve().parent.parent

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


def model_section(
    *,
    mode: str = "single",
    repo: Path,
    versions: dict[str, str] | None = None,
    extra: str = "",
    name: str = "cancer",
    stable: str = "v1",
) -> str:
    """A `[models.<name>]` table (and its versions, by default the demo's v1 and v2)."""
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


def infer_body(
    rows: np.ndarray[Any, Any], *, rid: str | None = None, datatype: str = "FP32"
) -> dict[str, Any]:
    """An Open Inference Protocol request body carrying `rows` as the one input tensor."""
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


# The exported metrics (docs/api.md, "Admin plane"), the contract the rules and the dashboard rely on.
COUNTERS = {
    "mlproxy_requests_total",
    "mlproxy_rows_total",
    "mlproxy_batches_total",
    "mlproxy_batch_rows_total",
    "mlproxy_queue_shed_total",
    "mlproxy_mirror_rows_total",
    "mlproxy_mirror_breaker_opened_total",
    "mlproxy_fallbacks_total",
    "mlproxy_shed_total",
    "mlproxy_refused_connections_total",
    "mlproxy_upstream_ejections_total",
    "mlproxy_upstream_refused_calls_total",
    "mlproxy_upstream_retries_total",
    "mlproxy_config_reloads_total",
    "mlproxy_alerts_total",
    "mlproxy_input_nonfinite_total",
    "mlproxy_feedback_total",
    "mlproxy_webhook_deliveries_total",
    "process_cpu_seconds_total",
}
GAUGES = {
    "mlproxy_traffic_weight_ratio",
    "mlproxy_queue_depth",
    "mlproxy_shadow_agreement_ratio",
    "mlproxy_shadow_mean_abs_diff",
    "mlproxy_inflight_requests",
    "mlproxy_admission_limit",
    "mlproxy_admission_waiting_requests",
    "mlproxy_version_available",
    "mlproxy_config_loaded_timestamp_seconds",
    "mlproxy_config_last_reload_success",
    "mlproxy_rollout_status",
    "mlproxy_alerts_open",
    "mlproxy_drift_score",
    "mlproxy_drift_level",
    "mlproxy_output_chi2_pvalue",
    "mlproxy_input_out_of_range_ratio",
    "mlproxy_input_duplicate_ratio",
    "mlproxy_accuracy_ratio",
    "mlproxy_holdout_accuracy_ratio",
    "mlproxy_mae",
    "mlproxy_holdout_mae",
    "mlproxy_event_loop_lag_seconds",
    "mlproxy_event_loop_busy_ratio",
    "process_resident_memory_bytes",
}
HISTOGRAMS = {
    "mlproxy_request_duration_seconds",
    "mlproxy_queue_wait_seconds",
    "mlproxy_batch_size_rows",
}
METRICS = COUNTERS | GAUGES | HISTOGRAMS
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shipped_config(
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


def http_get(url: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
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
def serve_process(path: Path, port: int, *, env: dict[str, str] | None = None) -> Iterator[Served]:
    """`mlproxy serve` in a real process, ready (it logged "serving") when the block starts,
    SIGTERMed after it; `output` then holds its whole log. `env` is added to the environment."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=None if env is None else {**os.environ, **env},
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


class DataTestServer(BaseTestServer):
    """aiohttp's test server around our own DataServer (its protocol: admission, timeouts,
    drain), where aiohttp's RawTestServer would build a plain web.Server around the handler."""

    def __init__(self, server: web.Server, **kwargs: Any) -> None:
        self._data_server = server
        super().__init__(host="127.0.0.1", **kwargs)

    async def _make_runner(self, **kwargs: Any) -> web.ServerRunner:
        return web.ServerRunner(self._data_server, **kwargs)


async def until(
    condition: Callable[[], Any], what: str, *, timeout: float = 10.0, every_s: float = 0.005
) -> None:
    """Poll `condition` (plain or async) every `every_s` until it holds; fail at the deadline
    (a bounded poll, not a sleep standing in for synchronisation)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"not within {timeout} s: {what}", pytrace=False)
        await asyncio.sleep(every_s)
