"""Faults, each against a real `mlproxy serve` process over real sockets: kill -9 in the middle
of a progressive rollout under load and a restart; a slow model past the queue deadline; an
upstream that dies mid-request; an audit log and a state file that cannot be written; the config
deleted and recreated; a corrupt model on reload. In every case the process keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import signal
import sys
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnx
import orjson
import pytest
from onnx import TensorProto, helper, numpy_helper

from proxy.runtime.serving import close_serving, create_serving
from proxy.runtime.state import AuditLog, Writer

from .helpers import BASE_CONFIG, free_port, infer_body, model_section, until
from .upstream import start_dying_upstream

START_TIMEOUT_S = 60.0  # importing onnxruntime and scipy on a busy 2-core box takes seconds
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)  # a request that takes longer is a hang


def listening(port: int, admin: int, *, limits: str = "", batching: str = "") -> str:
    """BASE_CONFIG on real ports, with [limits] and [batching] lines replaced as given."""
    text = BASE_CONFIG.format(max_body=4194304, max_inflight=512)
    text = text.replace("port = 0", f"port = {port}")
    if limits:
        text = text.replace("queue_timeout_ms = 1000\n", limits)
    if batching:
        text = text.replace("max_batch_size = 64\n", batching)
    return text + f"[admin]\nport = {admin}\n"


def write_text_atomic(path: Path, text: str) -> None:
    """As an editor saves: write beside, then rename (the watcher sees old or new, never half)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.replace(path)


@dataclass
class Proxy:
    """A running `mlproxy serve`, driven from the test's event loop; its log lines arrive in
    `lines` as the process writes them."""

    proc: asyncio.subprocess.Process
    port: int
    admin: int
    lines: list[str] = field(default_factory=list)
    grew: asyncio.Event = field(default_factory=asyncio.Event)
    pump: asyncio.Future[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def read_lines(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode(errors="replace"))
            self.grew.set()
        self.grew.set()

    async def wait_for_line(self, text: str, *, after: int = 0, timeout: float = 30.0) -> int:
        """The index of the first log line from `after` on that contains `text`; fails at the
        deadline or when the process exits first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.grew.clear()
            for i in range(after, len(self.lines)):
                if text in self.lines[i]:
                    return i
            assert self.pump is not None
            if self.pump.done():
                pytest.fail(f"mlproxy exited before logging {text!r}:\n{self.output}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                pytest.fail(f"no log line with {text!r} in {timeout} s; log so far:\n{self.output}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.grew.wait(), remaining)

    def count(self, text: str) -> int:
        return sum(1 for line in self.lines if text in line)

    async def wait_for_count(self, text: str, n: int, *, timeout: float = 30.0) -> None:
        """Until `n` log lines contain `text` (fails if more do, or at the deadline)."""
        after = 0
        for _ in range(n):
            after = await self.wait_for_line(text, after=after, timeout=timeout) + 1
        assert self.count(text) == n, self.output


@contextlib.asynccontextmanager
async def running(path: Path, port: int, admin: int) -> AsyncIterator[Proxy]:
    """`mlproxy serve --config path` in a real process, listening when the block starts;
    SIGTERMed (and waited for) after it unless the test already ended it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        limit=1 << 20,
    )
    proxy = Proxy(proc, port, admin)
    proxy.pump = asyncio.ensure_future(proxy.read_lines())
    try:
        await proxy.wait_for_line(
            f"serving {path} on http://127.0.0.1:{port}", timeout=START_TIMEOUT_S
        )
        yield proxy
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await asyncio.wait_for(proxy.pump, timeout=10)


async def status_of(http: aiohttp.ClientSession, proxy: Proxy) -> dict[str, Any]:
    async with http.get(proxy.admin_url + "/admin/status") as resp:
        assert resp.status == 200
        doc: dict[str, Any] = orjson.loads(await resp.read())
        return doc


async def infer(
    http: aiohttp.ClientSession, url: str, body: bytes, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with http.post(
        url, data=body, headers={"Content-Type": "application/json", **headers}
    ) as resp:
        return resp.status, dict(resp.headers), await resp.read()


# ---------------------------------------------------------------------------------------------
# kill -9 in the middle of a progressive rollout, under load, then a restart

STEPS = [20, 30, 40, 50, 60, 70, 80, 90, 100]
ROLLOUT = (
    "[models.cancer.canary]\n"
    "weights = { v1 = 90, v2 = 10 }\n"
    f"steps = {STEPS}\n"
    "step_interval_s = 0.5\n"
    "gates = { max_error_rate = 0.5, max_p99_ms = 10000, min_requests = 5 }\n"
)
TORN = b'{"cause": "gates held for 0.5 s", "event": "rollout_st'  # a crash mid-append


@pytest.mark.timeout(150)
async def test_kill_9_mid_rollout_under_load_then_restart_restores_the_weights(
    tmp_path: Path, model_repo: Path, cancer_rows: Any
) -> None:
    port, admin = free_port(), free_port()
    path = tmp_path / "config.toml"
    path.write_text(
        listening(port, admin) + model_section(mode="canary", repo=model_repo) + ROLLOUT
    )
    state_path, audit_path = tmp_path / "config.state.json", tmp_path / "config.audit.jsonl"
    body = orjson.dumps(infer_body(cancer_rows[:1]))
    statuses: list[int] = []
    cut_off: list[BaseException] = []

    async def user(http: aiohttp.ClientSession, url: str) -> None:
        """Sends until the process dies (bounded: 50,000 requests)."""
        for _ in range(50_000):
            try:
                status, _, _ = await infer(http, url, body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                cut_off.append(exc)
                return
            statuses.append(status)

    async with (
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http,
        running(path, port, admin) as proxy,
    ):  # the proxy is killed: no shutdown waits for the session's connections
        users = [
            asyncio.ensure_future(user(http, proxy.url + "/v2/models/cancer/infer"))
            for _ in range(4)
        ]
        seen: list[float] = []

        async def mid_way() -> bool:
            rollout = (await status_of(http, proxy))["models"]["cancer"]["rollout"]
            seen.append(rollout["weight"])
            return bool(rollout["weight"] >= 40)

        await until(mid_way, "the rollout reaching 40%", timeout=60, every_s=0.05)
        proxy.proc.kill()  # SIGKILL, with the load running
        assert await asyncio.wait_for(proxy.proc.wait(), timeout=10) == -signal.SIGKILL
        await asyncio.wait_for(asyncio.gather(*users), timeout=30)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert len(cut_off) == 4  # each user ended on the kill, none on a hang
    assert seen[-1] < 100, "promoted before the kill: the test did not catch it mid-way"

    # What the kill left on disk: the state file is whole JSON (written atomically)...
    saved = orjson.loads(state_path.read_bytes())["models"]["cancer"]
    assert saved["status"] == "progressing" and saved["weight"] in STEPS, saved
    # ...and so is every line of the audit log (an append is one write of one line).
    lines = audit_path.read_bytes().splitlines()
    entries = [orjson.loads(line) for line in lines]
    assert entries[0]["event"] == "start"
    steps = [e for e in entries if e["event"] == "rollout_step"]
    # The writer thread writes the state before the audit line of each step: the state is
    # the last step logged, or the one after it when the kill fell in between.
    assert steps and saved["weight"] >= steps[-1]["weight_after"] >= 30
    assert saved["weight"] <= min(s for s in STEPS if s > steps[-1]["weight_after"])
    # A crash can also tear the last line in the middle of an append: leave one so.
    with audit_path.open("ab") as f:
        f.write(TORN)

    async with (
        running(path, port, admin) as proxy,
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http,
    ):
        rollout = (await status_of(http, proxy))["models"]["cancer"]
        assert rollout["rollout"]["weight"] == saved["weight"]
        assert rollout["rollout"]["status"] == "progressing"
        assert rollout["rollout"]["cause"].startswith("restored: ")
        w = saved["weight"] / 100
        assert rollout["weights"] == pytest.approx({"v1": 1 - w, "v2": w})
        for _ in range(20):  # and it serves, on the restored split
            status, headers, _ = await infer(http, proxy.url + "/v2/models/cancer/infer", body)
            assert status == 200 and headers["x-model-version"] in ("v1", "v2")

    # The torn line stays on a line of its own: every entry written after it is whole, and
    # reading the log skips the torn one.
    lines = audit_path.read_bytes().splitlines()
    torn_at = lines.index(TORN)
    after = [orjson.loads(line) for line in lines[torn_at + 1 :]]
    assert after[0]["event"] == "start" and after[-1]["event"] == "stop"
    writer = Writer()
    try:
        read = AuditLog(audit_path, writer).read()
    finally:
        writer.close()
    assert len(read) == len(lines) - 1 and read[len(entries)]["event"] == "start"


# ---------------------------------------------------------------------------------------------
# a slow model: requests past the queue deadline are shed, the others answered, nothing hangs

SLOW_MATMULS = 24  # 512 x 512 each: ~100 ms a run on one core of the 2-core box, more when busy


def build_slow(repo: Path, version: str = "slow") -> Path:
    """A model that takes ~0.1 s a run whatever its batch: a chain of 512 x 512 matrix products
    of a matrix that depends on the input (so onnxruntime cannot fold it away), whose result is
    multiplied by 0 and added to constant probabilities 0.5 / 0.5."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 30])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, [None])
    probs = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])

    def const(name: str, value: np.ndarray[Any, Any]) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [name], value=numpy_helper.from_array(value, name + "_value")
        )

    nodes = [
        const("size", np.array([512, 512], np.int64)),
        const("starts", np.array([0], np.int64)),
        const("ends", np.array([1], np.int64)),
        const("axes", np.array([1], np.int64)),
        const("zero", np.array(0.0, np.float32)),
        const("half", np.array(0.5, np.float32)),
        helper.make_node(
            "ConstantOfShape",
            ["size"],
            ["ones"],
            value=numpy_helper.from_array(np.array([1.0], np.float32)),
        ),
        helper.make_node("EyeLike", ["ones"], ["eye"]),
        helper.make_node("ReduceSum", ["input"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),
        helper.make_node("Add", ["eye", "nothing"], ["m0"]),
    ]
    nodes += [
        helper.make_node("MatMul", [f"m{i}", "m0"], [f"m{i + 1}"]) for i in range(SLOW_MATMULS)
    ]
    nodes += [
        helper.make_node("ReduceSum", [f"m{SLOW_MATMULS}"], ["sum"], keepdims=0),
        helper.make_node("Mul", ["sum", "zero"], ["still_nothing"]),
        helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["first"]),
        helper.make_node("Mul", ["first", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "half"], ["halves"]),
        helper.make_node("Add", ["halves", "still_nothing"], ["p"]),
        helper.make_node("Concat", ["p", "p"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "slow", [x], [label, probs]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    blob = model.SerializeToString()
    directory = repo / "cancer" / version
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(blob)
    manifest = orjson.loads((repo / "cancer" / "v1" / "manifest.json").read_bytes())
    manifest["version"] = version
    manifest["model"]["sha256"] = hashlib.sha256(blob).hexdigest()
    del manifest["baseline"]  # no drift monitoring: the answers are constant
    (directory / "manifest.json").write_bytes(orjson.dumps(manifest))
    return directory


async def test_a_slow_model_sheds_requests_past_the_queue_deadline_and_answers_the_rest(
    tmp_path: Path, repo: Path, cancer_rows: Any
) -> None:
    """One row a run, runs of ~0.1 s, a queue deadline of 20 ms: of 12 requests at once, those
    that reach a run in time are answered 200, the rest 503 with Retry-After; health checks
    answer meanwhile; nothing waits longer than a few runs."""
    build_slow(repo)
    port, admin = free_port(), free_port()
    path = tmp_path / "config.toml"
    versions = {"slow": f'{{ path = "{repo}/cancer/slow" }}'}
    path.write_text(
        listening(port, admin, limits="queue_timeout_ms = 20\n", batching="max_batch_size = 1\n")
        + model_section(repo=repo, versions=versions, stable="slow")
    )
    body = orjson.dumps(infer_body(cancer_rows[:1]))
    loop = asyncio.get_running_loop()
    async with (
        running(path, port, admin) as proxy,
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http,
    ):
        url = proxy.url + "/v2/models/cancer/infer"

        async def timed(coro: Awaitable[Any]) -> tuple[Any, float]:
            started = loop.time()
            return await coro, loop.time() - started

        async def health() -> int:
            async with http.get(proxy.url + "/v2/health/live") as resp:
                return resp.status

        requests = [asyncio.ensure_future(timed(infer(http, url, body))) for _ in range(12)]
        probes = [asyncio.ensure_future(timed(health())) for _ in range(3)]
        answers = await asyncio.wait_for(asyncio.gather(*requests), timeout=60)
        probed = await asyncio.wait_for(asyncio.gather(*probes), timeout=60)
        codes = sorted(status for (status, _, _), _ in answers)
        assert set(codes) == {200, 503}, codes
        for (status, headers, payload), _ in answers:
            if status == 503:
                assert int(headers["Retry-After"]) >= 1
                assert "overloaded" in orjson.loads(payload)["error"]
            else:
                assert orjson.loads(payload)["outputs"][0]["data"] == [0]
        assert all(status == 200 for status, _ in probed)
        # A health probe is not queued behind the model: each is answered before the burst is.
        assert max(took for _, took in probed) < max(took for _, took in answers)
        status, _, _ = await infer(http, url, body)  # once the burst is over: served
        assert status == 200
        assert proxy.proc.returncode is None


# ---------------------------------------------------------------------------------------------
# an upstream that dies mid-request


@pytest.fixture
async def upstream_serving(write_config: Any, model_repo: Path) -> AsyncIterator[Any]:
    """A real mlproxy serving cancer v2 in this process: the dying upstream's metadata."""
    config = write_config(model_section(repo=model_repo, stable="v2"), name="upstream.toml")
    serving = await create_serving(config, rng=random.Random(0))
    yield serving
    await close_serving(serving)


@pytest.mark.parametrize("how", ["after_request", "mid_response"])
async def test_an_upstream_dying_mid_request_is_a_502_or_the_stable_answer(
    tmp_path: Path,
    model_repo: Path,
    cancer_rows: Any,
    aiohttp_raw_server: Any,
    upstream_serving: Any,
    how: str,
) -> None:
    up, _, upstream_url = await start_dying_upstream(aiohttp_raw_server, upstream_serving, how)
    port, admin = free_port(), free_port()
    path = tmp_path / "config.toml"
    versions = {
        "v1": f'{{ path = "{model_repo}/cancer/v1" }}',
        "v3": f'{{ url = "{upstream_url}", timeout_ms = 5000 }}',
    }
    path.write_text(
        listening(port, admin)
        + model_section(mode="canary", repo=model_repo, versions=versions)
        + "[models.cancer.canary]\nweights = { v1 = 50, v3 = 50 }\n"
    )
    body = orjson.dumps(infer_body(cancer_rows[:1]))
    async with (
        running(path, port, admin) as proxy,
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http,
    ):
        routed = [await infer(http, proxy.url + "/v2/models/cancer/infer", body) for _ in range(30)]
        # Routed requests: the ones sent to v3 fall back to the stable version's answer.
        assert {(s, h["x-model-version"]) for s, h, _ in routed} == {(200, "v1")}
        assert up.received > 0  # some did reach v3, and it died on them
        pinned = [
            await infer(http, proxy.url + "/v2/models/cancer/versions/v3/infer", body)
            for _ in range(5)
        ]
        for status, headers, payload in pinned:
            # 502/504 from the call itself; 503 + Retry-After once a breaker stops calling it
            assert status in (502, 503, 504), (status, payload)
            assert status != 503 or "Retry-After" in headers
            assert "v3" in orjson.loads(payload)["error"]
        # The proxy keeps serving.
        status, headers, _ = await infer(
            http, proxy.url + "/v2/models/cancer/versions/v1/infer", body
        )
        assert status == 200
        async with http.get(proxy.url + "/v2/health/ready") as resp:
            assert resp.status == 200
        assert proxy.proc.returncode is None
    assert proxy.proc.returncode == 0, proxy.output
    assert "Traceback" not in proxy.output, proxy.output


# ---------------------------------------------------------------------------------------------
# the audit log's disk is full, the state file cannot be written

GATED = "[models.cancer.canary]\nweights = { v1 = 50, v2 = 50 }\ngates = { max_error_rate = 0.5 }\n"


async def test_an_unwritable_audit_log_and_state_file_do_not_stop_serving(
    tmp_path: Path, model_repo: Path, cancer_rows: Any
) -> None:
    """The audit log on a full disk (/dev/full: every write fails with ENOSPC) and the state file
    a directory (no rename can replace it): the proxy serves, reloads, rolls back and promotes;
    each failure is logged once, not per write, and each unwritten audit entry is kept in the
    log; SIGTERM still stops it cleanly."""
    port, admin = free_port(), free_port()
    path = tmp_path / "config.toml"
    path.write_text(listening(port, admin) + model_section(mode="canary", repo=model_repo) + GATED)
    audit_path = tmp_path / "config.audit.jsonl"
    if Path("/dev/full").exists():
        audit_path.symlink_to("/dev/full")
    else:  # no /dev/full: a directory, which no append can open
        audit_path.mkdir()
    (tmp_path / "config.state.json").mkdir()
    body = orjson.dumps(infer_body(cancer_rows[:1]))
    async with (
        running(path, port, admin) as proxy,
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http,
    ):
        url = proxy.url + "/v2/models/cancer/infer"
        assert {(await infer(http, url, body))[0] for _ in range(20)} == {200}
        for _ in range(3):
            async with http.post(proxy.admin_url + "/admin/reload") as resp:
                assert resp.status == 200 and (await resp.json())["outcome"] == "ok"
        for action in ("rollback", "promote", "rollback"):
            async with http.post(proxy.admin_url + f"/admin/models/cancer/{action}") as resp:
                assert resp.status == 200, await resp.text()
        doc = await status_of(http, proxy)
        assert doc["models"]["cancer"]["weights"] == {"v1": 1.0, "v2": 0.0}
        answered = {(await infer(http, url, body))[1]["x-model-version"] for _ in range(20)}
        assert answered == {"v1"}
        # 1 start + 3 reloads + 3 rollout changes, each kept in the log since the file refused it
        await proxy.wait_for_count("audit entry not written", 7)
        assert proxy.count("cannot append to audit log") == 1, proxy.output
        assert proxy.count("cannot write rollout state") == 1, proxy.output
        assert not list(tmp_path.glob(".config.state.json.*")), "a temp file was left behind"
    assert proxy.proc.returncode == 0, proxy.output
    assert "Traceback" not in proxy.output, proxy.output


# ---------------------------------------------------------------------------------------------
# the config deleted and recreated while serving


async def test_a_deleted_config_keeps_serving_and_a_recreated_one_is_reloaded(
    tmp_path: Path, model_repo: Path, cancer_rows: Any
) -> None:
    port, admin = free_port(), free_port()
    path = tmp_path / "config.toml"
    on_v1 = listening(port, admin) + model_section(repo=model_repo)
    on_v2 = on_v1.replace('stable = "v1"', 'stable = "v2"')
    path.write_text(on_v1)
    body = orjson.dumps(infer_body(cancer_rows[:1]))
    async with (
        running(path, port, admin) as proxy,
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http,
    ):
        url = proxy.url + "/v2/models/cancer/infer"

        async def answered_by() -> str:
            status, headers, payload = await infer(http, url, body)
            assert status == 200, payload
            return headers["x-model-version"]

        path.unlink()
        # Deleted: the running config serves on; a reload asked for is refused and shown.
        assert await answered_by() == "v1"
        async with http.post(proxy.admin_url + "/admin/reload") as resp:
            assert resp.status == 422
            assert "cannot read file" in (await resp.json())["errors"][0]
        doc = await status_of(http, proxy)
        assert "cannot read file" in doc["config"]["last_error"]
        assert doc["models"]["cancer"]["stable"] == "v1"
        mark = len(proxy.lines)
        proxy.proc.send_signal(signal.SIGHUP)
        await proxy.wait_for_line("reload (SIGHUP) refused", after=mark)
        assert await answered_by() == "v1"

        # Recreated, valid and changed: the watcher loads it.
        mark = len(proxy.lines)
        write_text_atomic(path, on_v2)
        await proxy.wait_for_line("reloaded (file changed)", after=mark)
        assert await answered_by() == "v2"
        assert (await status_of(http, proxy))["config"]["last_error"] is None

        # Deleted and recreated invalid: refused, shown, v2 keeps serving.
        path.unlink()
        mark = len(proxy.lines)
        write_text_atomic(path, on_v2 + "[models.cancer.nonsense]\nkey = 1\n")
        await proxy.wait_for_line("reload (file changed) refused", after=mark)
        doc = await status_of(http, proxy)
        assert "models.cancer.nonsense" in doc["config"]["last_error"]
        assert await answered_by() == "v2"

        # Deleted and recreated as the config in force: nothing to load, and the refusal of the
        # file that is gone is no longer shown.
        path.unlink()
        mark = len(proxy.lines)
        write_text_atomic(path, on_v2)
        await proxy.wait_for_line("is the config in force again", after=mark)
        assert (await status_of(http, proxy))["config"]["last_error"] is None
        assert await answered_by() == "v2"
    assert proxy.proc.returncode == 0, proxy.output


# ---------------------------------------------------------------------------------------------
# a corrupt model on reload


async def test_a_corrupt_model_on_reload_is_refused_and_the_old_plan_serves(
    tmp_path: Path, repo: Path, cancer_rows: Any
) -> None:
    port, admin = free_port(), free_port()
    path = tmp_path / "config.toml"
    path.write_text(
        listening(port, admin)
        + model_section(mode="canary", repo=repo)
        + "[models.cancer.canary]\nweights = { v1 = 50, v2 = 50 }\n"
    )
    model_file, manifest_file = (
        repo / "cancer" / "v2" / "model.onnx",
        repo / "cancer" / "v2" / "manifest.json",
    )
    good_model, good_manifest = model_file.read_bytes(), manifest_file.read_bytes()
    body = orjson.dumps(infer_body(cancer_rows[:1]))
    flipped = bytearray(good_model)
    flipped[len(flipped) // 2] ^= 0xFF
    truncated = good_model[: len(good_model) // 2]
    manifest = orjson.loads(good_manifest)
    manifest["model"]["sha256"] = hashlib.sha256(truncated).hexdigest()
    damages = [
        ("bytes changed", bytes(flipped), good_manifest, "sha256 is"),
        ("truncated, manifest matching", truncated, orjson.dumps(manifest), "onnxruntime"),
    ]
    async with (
        running(path, port, admin) as proxy,
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http,
    ):
        digest = (await status_of(http, proxy))["config"]["digest"]
        for what, model_bytes, manifest_bytes, words in damages:
            model_file.write_bytes(model_bytes)
            manifest_file.write_bytes(manifest_bytes)
            async with http.post(proxy.admin_url + "/admin/reload") as resp:
                assert resp.status == 422, what
                errors = (await resp.json())["errors"]
            assert any("models.cancer.versions.v2:" in e and words in e for e in errors), errors
            doc = await status_of(http, proxy)
            assert words in doc["config"]["last_error"] and doc["config"]["digest"] == digest
            # The old plan serves, v2 included: its session was loaded from the good file.
            for version in ("v1", "v2"):
                status, headers, _ = await infer(
                    http, proxy.url + f"/v2/models/cancer/versions/{version}/infer", body
                )
                assert (status, headers["x-model-version"]) == (200, version), what
            status, _, _ = await infer(http, proxy.url + "/v2/models/cancer/infer", body)
            assert status == 200
        model_file.write_bytes(good_model)
        manifest_file.write_bytes(good_manifest)
        async with http.post(proxy.admin_url + "/admin/reload") as resp:
            assert resp.status == 200 and (await resp.json())["outcome"] == "ok"
        assert (await status_of(http, proxy))["config"]["last_error"] is None
    assert proxy.proc.returncode == 0, proxy.output
