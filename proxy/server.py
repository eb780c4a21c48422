"""Run both planes on one event loop; reload on file change and SIGHUP; drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from proxy.config.schema import Config
from proxy.engine.pool import CountsPool
from proxy.http.admin import create_admin_app
from proxy.http.data import create_data_server
from proxy.http.refusals import ScrubHttpErrors
from proxy.http.transport import DataServer
from proxy.runtime import pooled
from proxy.runtime.decisions import SharedDecisions
from proxy.runtime.serving import Serving, create_serving

log = logging.getLogger("mlproxy")
DRAIN_TIMEOUT_S = 10.0
BACKLOG = 2048


@dataclass(frozen=True, slots=True)
class Worker:
    """This process is worker `slot` of a supervisor (`workers = N`): it serves the data plane
    on the supervisor's listening socket `fd` (inherited) and publishes its counts into `pool`;
    the supervisor serves the admin plane, watches the file and decides rollouts."""

    slot: int
    fd: int
    pool: CountsPool
    decisions: SharedDecisions
    onnx_threads: int = 1


async def serve(
    config: Config,
    *,
    stop: asyncio.Event | None = None,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
    ready: asyncio.Event | None = None,
    draining: asyncio.Event | None = None,
    worker: Worker | None = None,
) -> None:
    """Serve `config` until `stop` is set (or SIGTERM/SIGINT arrives), then drain and close.

    Shutdown order: stop accepting connections, let requests in flight finish (at most
    `drain_timeout_s`), close connections, then the plan; the state file and the audit log are
    written on every change, so nothing is left to flush but a last audit line.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if worker is None:
        serving = await create_serving(config)
    else:
        serving = await create_serving(config, worker=worker.pool, onnx_threads=worker.onnx_threads)
        # count on from what this slot's predecessor published: the group's counts never
        # go backwards when a worker is restarted
        worker.pool.adopt(serving.counters, serving.counters.version_keys())
        pooled.adopt(worker.pool, serving.watch)
    reloads = _handle_signals(loop, serving, stop)
    data_server = create_data_server(serving)
    data_runner = web.ServerRunner(
        data_server, handle_signals=False, shutdown_timeout=drain_timeout_s
    )
    admin_runner = None
    publish: Callable[[], None] | None = None
    if worker is None:
        admin_runner = web.AppRunner(
            create_admin_app(serving),
            handle_signals=False,
            access_log=None,
            logger=admin_http_log(),
        )
        background = loop.create_task(serving.scheduler.run())
    else:
        publish = _publisher(serving, worker)
        background = loop.create_task(
            serving.scheduler.run(watch_file=False, step_rollouts=False, every=publish)
        )
    try:
        await data_runner.setup()
        s, a = config.server, config.admin
        if admin_runner is not None:
            data_site: web.BaseSite = web.TCPSite(data_runner, s.host, s.port, backlog=BACKLOG)
            await data_site.start()
            data_server.listen_on(_listening_fd(data_site))
            await admin_runner.setup()
            await web.TCPSite(admin_runner, a.host, a.port).start()
            log_listening(config)
        else:
            assert worker is not None and publish is not None
            listener = socket.socket(fileno=os.dup(worker.fd))
            data_site = web.SockSite(data_runner, listener)
            await data_site.start()
            data_server.listen_on(worker.fd)
            os.close(worker.fd)  # the site and the heartbeat hold their own handles
            publish()
            log.info("worker %d serving %s", worker.slot, config.source)
        if ready is not None:
            ready.set()  # the planes listen
        await stop.wait()
        await _drain(serving, data_server, data_site, drain_timeout_s, draining)
    finally:
        background.cancel()
        for task in (background, *reloads):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if publish is not None:
            serving.watch.flush()  # rows still buffered: counted before the last publish
            publish()  # the last counts: what the drain answered
        await data_runner.cleanup()
        if admin_runner is not None:
            await admin_runner.cleanup()
        await serving.close()
        if worker is not None:
            worker.pool.close()
            worker.decisions.close()
    log.info("stopped")


def _publisher(serving: Serving, worker: Worker) -> Callable[[], None]:
    """A worker's counts and identity into its rows of the group's shared memory; and the
    supervisor's rollout decisions into this worker's routing."""
    pid, started = os.getpid(), time.time()

    def publish() -> None:
        worker.decisions.follow(serving.rollouts)
        pooled.publish(worker.pool, serving.watch)
        pooled.publish_ids(worker.pool, serving.ids)
        worker.pool.publish(serving.counters, serving.counters.version_keys())
        c = serving.counters
        worker.pool.publish_member(
            pid=pid,
            digest=serving.config.digest,
            started_at=started,
            requests=c.requests_total(),
        )

    return publish


def _listening_fd(site: web.BaseSite) -> int:
    """The data site's listening socket (aiohttp keeps the loop's server private)."""
    sockets: list[socket.socket] = list(getattr(site._server, "sockets", None) or [])
    if not sockets:
        raise RuntimeError("the data plane's site has no listening socket")
    return sockets[0].fileno()


def admin_http_log() -> logging.Logger:
    """aiohttp's server logger for the admin plane, with bad requests scrubbed of their bytes."""
    logger = logging.getLogger("mlproxy.admin.http")
    if not any(isinstance(f, ScrubHttpErrors) for f in logger.filters):
        logger.addFilter(ScrubHttpErrors())
    return logger


def _handle_signals(
    loop: asyncio.AbstractEventLoop, serving: Serving, stop: asyncio.Event
) -> set[asyncio.Task[object]]:
    """SIGTERM and SIGINT stop; SIGHUP reloads. Returns the set SIGHUP's reloads are kept in."""
    reloads: set[asyncio.Task[object]] = set()

    def on_hup() -> None:
        task = loop.create_task(serving.reloader.reload("SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig, handler in (
        (signal.SIGTERM, stop.set),
        (signal.SIGINT, stop.set),
        (signal.SIGHUP, on_hup),
    ):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests)
            loop.add_signal_handler(sig, handler)
    return reloads


def log_listening(config: Config) -> None:
    s, a = config.server, config.admin
    log.info(
        "serving %s on http://%s:%d (admin http://%s:%d); models: %s",
        config.source,
        s.host,
        s.port,
        a.host,
        a.port,
        ", ".join(f"{m.name} [{m.mode}: {', '.join(m.versions)}]" for m in config.models.values()),
    )


async def _drain(
    serving: Serving,
    server: DataServer,
    site: web.BaseSite,
    timeout_s: float,
    draining: asyncio.Event | None,
) -> None:
    """Stop accepting connections; answer every request already received, each with
    Connection: close; close idle keep-alive connections after a short grace (a request already
    on the wire is answered, not cut); wait (at most `timeout_s` in all) for both."""
    log.info(
        "stopping: no new connections; draining %d request(s) in flight (up to %.0f s)",
        serving.current.inflight,
        timeout_s,
    )
    server.stop_accepting()
    await site.stop()  # closes the listening socket; open connections carry on
    server.start_drain()
    if draining is not None:
        draining.set()
    deadline = asyncio.get_running_loop().time() + timeout_s
    drained = await serving.current.drained(timeout_s)
    remaining = max(deadline - asyncio.get_running_loop().time(), 0.0)
    closed = await server.connections_closed(remaining)
    if not closed:
        log.warning("drain: %d connection(s) still open are closed", server.open_connections)
    if not drained:
        log.warning(
            "drain timeout: %d request(s) still in flight are cut off", serving.current.inflight
        )
    serving.audit.append("stop", digest=serving.config.digest, drained=drained)
