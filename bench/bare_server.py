"""A bare aiohttp + uvloop inference server: the reference points bench/throughput.py compares to.

It does the least a JSON inference server can do, with the same stack as mlproxy (aiohttp's
low-level `web.Server` on uvloop, orjson, numpy):

* ``--mode fixed``: parse the Open Inference Protocol body into a float32 numpy array and reply
  a fixed JSON body. This is the HTTP + JSON ceiling ("http-limit") of one core.
* ``--mode inline``: also run the ONNX model inline, on the event loop, per request
  (onnxruntime with one intra-op and one inter-op thread) and reply its outputs as JSON.
  This is the "inline-onnx" baseline a proxy must beat.
* ``--mode batched``: the same model behind a simple micro-batcher: a request's rows join the
  open batch, which runs when it holds BATCH_ROWS rows or BATCH_WAIT_S after its first request,
  as one `session.run` in a one-thread executor; each request gets its own rows' outputs.
  This is the "batched-onnx" baseline (issue 11: single must reach 0.9x it per core, goal 1.0x).

GET /v2/health/ready answers {"ready": true} once the model is loaded and the port is open.

Run: ``.venv/bin/python bench/bare_server.py --port 9000 --mode inline
--model models/cancer/v1/model.onnx``
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import uvloop
from aiohttp import web

JSON_HEADERS = {"Content-Type": "application/json"}
DATATYPES = {
    np.dtype(np.int64): "INT64",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
}
READY = orjson.dumps({"ready": True})
MODEL_NAME = "cancer"
BATCH_ROWS = 32
BATCH_WAIT_S = 0.001


class Model:
    """One onnxruntime session, single-threaded, run inline."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        n_features = self.session.get_inputs()[0].shape[1]
        self.run(np.zeros((1, n_features), dtype=np.float32))  # warm-up

    def run(self, x: np.ndarray[Any, Any]) -> bytes:
        return self.answer(self.session.run(self.output_names, {self.input_name: x}))

    def answer(self, results: list[np.ndarray[Any, Any]]) -> bytes:
        outputs = [
            {
                "name": name,
                "datatype": DATATYPES.get(arr.dtype) or str(arr.dtype),
                "shape": arr.shape,
                "data": arr.reshape(-1),
            }
            for name, arr in zip(self.output_names, results, strict=True)
        ]
        return orjson.dumps(
            {"model_name": MODEL_NAME, "model_version": "v1", "outputs": outputs},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )


class Batcher:
    """Rows from many requests, run together: at BATCH_ROWS rows, or BATCH_WAIT_S after the
    batch's first request, one `session.run` in a one-thread executor."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.loop = asyncio.get_running_loop()
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.rows: list[np.ndarray[Any, Any]] = []
        self.waiters: list[tuple[asyncio.Future[bytes], int, int]] = []  # (answer, start, stop)
        self.n = 0
        self.timer: asyncio.TimerHandle | None = None

    async def run(self, x: np.ndarray[Any, Any]) -> bytes:
        fut: asyncio.Future[bytes] = self.loop.create_future()
        self.rows.append(x)
        self.waiters.append((fut, self.n, self.n + len(x)))
        self.n += len(x)
        if self.n >= BATCH_ROWS:
            self.flush()
        elif self.timer is None:
            self.timer = self.loop.call_later(BATCH_WAIT_S, self.flush)
        return await fut

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        rows, waiters = self.rows, self.waiters
        self.rows, self.waiters, self.n = [], [], 0
        if rows:
            task = self.loop.run_in_executor(self.executor, self._run, np.concatenate(rows))
            task.add_done_callback(lambda t: self._answer(t, waiters))

    def _run(self, x: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
        m = self.model
        return list(m.session.run(m.output_names, {m.input_name: x}))

    def _answer(
        self, task: asyncio.Future[list[Any]], waiters: list[tuple[asyncio.Future[bytes], int, int]]
    ) -> None:
        exc = task.exception()
        for fut, start, stop in waiters:
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(self.model.answer([r[start:stop] for r in task.result()]))


def parse_rows(body: bytes) -> np.ndarray[Any, Any]:
    """The first input tensor of an Open Inference Protocol JSON body, as float32 rows."""
    tensor = orjson.loads(body)["inputs"][0]
    return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])


def make_handler(mode: str, model: Model | None) -> Any:
    batcher: Batcher | None = None
    fixed = orjson.dumps(
        {
            "model_name": MODEL_NAME,
            "model_version": "v1",
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [1], "data": [0]},
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": [1, 2],
                    "data": [0.9700000286102295, 0.029999999329447746],
                },
            ],
        }
    )

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "GET":
            if request.path == "/v2/health/ready":
                return web.Response(body=READY, headers=JSON_HEADERS)
            return web.Response(status=404)
        try:
            x = parse_rows(await request.read())
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            return web.Response(status=400, text=f"bad request: {exc!r}")
        if mode == "fixed" or model is None:
            return web.Response(body=fixed, headers=JSON_HEADERS)
        if mode == "batched":
            nonlocal batcher
            if batcher is None:
                batcher = Batcher(model)
            return web.Response(body=await batcher.run(x), headers=JSON_HEADERS)
        return web.Response(body=model.run(x), headers=JSON_HEADERS)

    return handle


async def serve(host: str, port: int, mode: str, model_path: Path) -> None:
    model = Model(model_path) if mode in ("inline", "batched") else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.ServerRunner(
        web.Server(make_handler(mode, model), access_log=None), handle_signals=False
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=2048, shutdown_timeout=2.0).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=("fixed", "inline", "batched"), default="fixed")
    p.add_argument(
        "--model",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "models/cancer/v1/model.onnx",
    )
    args = p.parse_args(argv)
    uvloop.run(serve(args.host, args.port, args.mode, args.model))


if __name__ == "__main__":
    main()
