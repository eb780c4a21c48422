"""`workers = N`: the supervisor (DESIGN section 7).

`supervise` binds the data port (one SO_REUSEPORT socket per worker slot, held by the
supervisor) and starts N workers (`mlproxy _worker`, fresh
interpreters: nothing is forked from a process that has an event loop, an onnxruntime session
or threads), each serving the data plane on its slot's socket (server.serve with a `Worker`). The
supervisor itself serves the admin plane from a Serving of its own whose counters it refreshes
from the workers' shared rows (engine/pool.py) every scheduler interval, so status, /metrics and
its rollout controllers see every worker's traffic. It watches the config file and reloads
first: a reload it refuses is refused for all; one it takes is forwarded to every worker as
SIGHUP. It restarts a worker that dies (supervisor.Workers: backoff, no restart loop), and on
SIGTERM stops accepting, lets each worker drain its own connections, and removes every shared
memory segment of the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

from proxy.config.schema import Config
from proxy.engine.pool import DIGEST_HEX, CountsPool
from proxy.engine.shared import sweep_stale, unlink_owned
from proxy.http.admin import create_admin_app
from proxy.runtime import pooled
from proxy.runtime.decisions import SharedDecisions
from proxy.runtime.serving import Serving, create_serving
from proxy.server import BACKLOG, DRAIN_TIMEOUT_S, admin_http_log, log_listening
from proxy.supervisor import Workers, usable_cpus

log = logging.getLogger("mlproxy.supervisor")
STEP_INTERVAL_S = 0.1  # how often dead workers are reaped and due restarts started


def worker_count(asked: int) -> int:
    """`workers = 0` is one per usable CPU."""
    return asked if asked > 0 else usable_cpus()


def onnx_threads(workers: int) -> int:
    """Serving threads per worker, so that workers x threads <= usable CPUs."""
    return max(1, usable_cpus() // workers)


def listen(host: str, port: int, count: int) -> list[socket.socket]:
    """The data plane's listening sockets, one per worker slot, all on one port (SO_REUSEPORT):
    the kernel spreads new connections over them by their addresses. One socket shared by all
    workers would not: measured, the first worker to wake accepted all 32 connections of a
    keep-alive client pool and served all 3,000 requests while the other served none. The
    supervisor holds every socket, so a dead worker's pending connections wait in its backlog
    for the restarted worker instead of being reset."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # port 0: the others join the one the first got
            sock.listen(BACKLOG)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def worker_command(
    config: Config, *, fds: list[int], group: int, threads: int
) -> Callable[[int], list[str]]:
    """slot -> the command line of that slot's worker (`fds[slot]` is its socket)."""

    def command(slot: int) -> list[str]:
        return [
            sys.executable, "-m", "proxy", "_worker", "--config", config.source,
            "--fd", str(fds[slot]), "--slot", str(slot), "--slots", str(len(fds)),
            "--group", str(group), "--threads", str(threads),
        ]  # fmt: skip

    return command


async def supervise(
    config: Config,
    *,
    workers: int,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
) -> int:
    """Run `workers` workers and the admin plane until SIGTERM (or `stop`); returns the exit
    code: 0 when every worker drained and exited 0, 1 when a worker kept failing at start."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    group = os.getpid()
    for name in [*sweep_stale(), *unlink_owned(group)]:
        log.info("removed shared memory %s left by an earlier run", name)
    socks = listen(config.server.host, config.server.port, workers)
    fds = [s.fileno() for s in socks]
    pool = CountsPool(group, slots=workers, slot=0)  # the supervisor only reads
    decisions = SharedDecisions(group)
    pooled.make_secret(pool)
    serving: Serving | None = None
    procs: Workers | None = None
    admin_runner: web.AppRunner | None = None
    tasks: list[asyncio.Task[Any]] = []
    try:
        serving = await create_serving(config, pooled=True)
        procs = Workers(
            workers,
            worker_command(config, fds=fds, group=group, threads=onnx_threads(workers)),
            pass_fds=lambda slot: [fds[slot]],
        )
        _follow(serving, procs, pool)
        _handle_signals(loop, serving, procs, stop)
        admin_runner = web.AppRunner(
            create_admin_app(serving),
            handle_signals=False,
            access_log=None,
            logger=admin_http_log(),
        )
        await admin_runner.setup()
        await web.TCPSite(admin_runner, config.admin.host, config.admin.port).start()
        procs.start()
        reaper = loop.create_task(_reap(procs, stop))
        tasks += [
            reaper,
            loop.create_task(serving.scheduler.run(every=_pooler(serving, pool, decisions))),
        ]
        log_listening(config)
        log.info("supervising %d workers: %s", workers, [s.pid for s in procs.slots])
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("stopping: every worker drains its connections (up to %.0f s)", drain_timeout_s)
        for sock in socks:  # each worker's own handle keeps its socket open until it drained
            sock.close()
        reaper.cancel()  # from here on `stop` alone reaps
        with contextlib.suppress(asyncio.CancelledError):
            await reaper
        codes = await loop.run_in_executor(None, procs.stop, drain_timeout_s + 5.0)
        _pooler(serving, pool, decisions)()  # the last counts the workers published
        serving.audit.append(
            "stop", digest=serving.config.digest, workers={str(k): v for k, v in codes.items()}
        )
        if procs.failed is not None:
            log.error("%s", procs.failed)
            return 1
        bad = {slot: code for slot, code in codes.items() if code != 0}
        if bad:
            log.warning("workers that did not exit 0: %s", bad)
        return 0
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if procs is not None and procs.live():
            procs.stop(0.0)
        for sock in socks:
            sock.close()
        if admin_runner is not None:
            await admin_runner.cleanup()
        if serving is not None:
            await serving.close()
        pool.close()
        decisions.close()
        unlink_owned(group)
        log.info("stopped")


def _pooler(serving: Serving, pool: CountsPool, decisions: SharedDecisions) -> Callable[[], None]:
    """Every interval: the workers' counts into the supervisor's view, their pooled bins into
    its drift windows (judged here, once), then its controllers' decisions out to the workers."""

    def refresh() -> None:
        pool.refresh(serving.counters, serving.counters.version_keys())
        pooled.advance(pool, serving.watch)
        decisions.publish(serving.rollouts)

    return refresh


def _follow(serving: Serving, procs: Workers, pool: CountsPool) -> None:
    """Status lists the workers: pid, the config digest each last said it serves (the full
    digest when it is one this supervisor serves, else the prefix it published; None until
    the worker has published), start, restarts, and the requests its slot served."""

    def members() -> list[dict[str, Any]]:
        said = {m.slot: m for m in pool.members()}
        mine = serving.config.digest
        out = []
        for w in procs.status():
            m = said.get(int(w["slot"]))  # type: ignore[call-overload]
            digest: str | None = None
            requests = None
            if m is not None and m.pid == w["pid"]:
                digest = mine if mine[:DIGEST_HEX] == m.digest_prefix else m.digest_prefix
                requests = m.requests
            out.append({**w, "digest": digest, "requests": requests})
        return out

    serving.group.follow(members)

    # a reload the supervisor took is every worker's: each re-reads the file on SIGHUP
    def forward(_plan: object) -> None:
        sent = procs.signal(signal.SIGHUP)
        log.info("reload forwarded to %d worker(s)", sent)

    serving.reloader.after_swap(forward)


async def _reap(procs: Workers, stop: asyncio.Event) -> None:
    """Reap and restart workers; stop the group when a slot keeps failing at start."""
    while not stop.is_set():
        for slot in procs.step():
            log.warning("worker %d (exit %s) died; restarting it", slot.index, slot.last_exit)
        if procs.failed is not None:
            log.error("%s", procs.failed)
            stop.set()
            return
        await asyncio.sleep(STEP_INTERVAL_S)  # a timer: reaping polls


def _handle_signals(
    loop: asyncio.AbstractEventLoop, serving: Serving, procs: Workers, stop: asyncio.Event
) -> None:
    """SIGTERM and SIGINT stop the group; SIGHUP reloads here first, then in every worker."""
    reloads: set[asyncio.Task[Any]] = set()

    def on_hup() -> None:
        task = loop.create_task(serving.reloader.reload("SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig, handler in (
        (signal.SIGTERM, stop.set),
        (signal.SIGINT, stop.set),
        (signal.SIGHUP, on_hup),
    ):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, handler)
