"""Run both planes on one event loop until told to stop, then drain and close."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from aiohttp import web

from .admin import create_admin_app
from .app import close_serving, create_data_server, create_serving
from .config import Config

log = logging.getLogger("mlproxy")
DRAIN_TIMEOUT_S = 10.0
# Each request allocates dozens of short-lived containers; with the default gen-0 threshold (700)
# the cyclic GC ran every ~20 requests and took ~10% of a busy core (py-spy, 4k req/s).
GC_THRESHOLDS = (20_000, 20, 20)


async def serve(config: Config, *, stop: asyncio.Event | None = None) -> None:
    """Serve `config` until `stop` is set (or SIGTERM/SIGINT arrives)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    serving = await create_serving(config)
    data_runner = web.ServerRunner(create_data_server(serving), handle_signals=False)
    admin_runner = web.AppRunner(create_admin_app(serving), handle_signals=False, access_log=None)
    try:
        await data_runner.setup()
        await admin_runner.setup()
        s, a = config.server, config.admin
        await web.TCPSite(
            data_runner, s.host, s.port, backlog=2048, shutdown_timeout=DRAIN_TIMEOUT_S
        ).start()
        await web.TCPSite(admin_runner, a.host, a.port).start()
        gc.collect()
        gc.freeze()  # what startup built lives forever: keep it out of every later collection
        gc.set_threshold(*GC_THRESHOLDS)
        log.info(
            "serving %s on http://%s:%d (admin http://%s:%d); models: %s",
            config.source,
            s.host,
            s.port,
            a.host,
            a.port,
            ", ".join(
                f"{m.name} [{m.mode}: {', '.join(m.versions)}]" for m in config.models.values()
            ),
        )
        await stop.wait()
        log.info("stopping: draining requests in flight (up to %.0f s)", DRAIN_TIMEOUT_S)
    finally:
        await data_runner.cleanup()
        await admin_runner.cleanup()
        await close_serving(serving)
    log.info("stopped")
