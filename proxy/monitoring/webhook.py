"""Deliver each alert as JSON to `[alerts] webhook`: a bounded queue, retries with backoff, never
in the way of serving (a full queue drops the alert and counts it)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from proxy.monitoring.alerts import Alert

log = logging.getLogger("mlproxy.webhook")
QUEUE_SIZE = 1000
ATTEMPTS = 5
FIRST_BACKOFF_S = 0.5
TIMEOUT_S = 5.0


class WebhookSender:
    """One task posts queued alerts in order; each gets ATTEMPTS tries, backing off 0.5, 1, 2, 4 s."""

    def __init__(
        self, url: str, http: aiohttp.ClientSession, *, first_backoff_s: float = FIRST_BACKOFF_S
    ) -> None:
        self.url = url
        self._http = http
        self._first_backoff_s = first_backoff_s
        self._queue: asyncio.Queue[Alert] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self.counts = {"ok": 0, "failed": 0, "dropped": 0}
        self._task: asyncio.Task[None] | None = None

    def submit(self, alert: Alert) -> None:
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            self.counts["dropped"] += 1
            log.warning("webhook queue full: alert dropped (%s)", alert.kind)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="webhook")

    async def idle(self) -> None:
        """Wait until every queued alert was delivered or given up (tests, shutdown)."""
        await self._queue.join()

    async def _run(self) -> None:
        while True:
            alert = await self._queue.get()
            try:
                await self._deliver(alert)
            finally:
                self._queue.task_done()

    async def _deliver(self, alert: Alert) -> None:
        doc = alert.to_json()
        delay = self._first_backoff_s
        for attempt in range(1, ATTEMPTS + 1):
            try:
                async with self._http.post(
                    self.url, json=doc, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)
                ) as resp:
                    await resp.read()
                    if resp.status < 300:
                        self.counts["ok"] += 1
                        return
                    reason = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                reason = repr(exc)
            if attempt < ATTEMPTS:
                log.info(
                    "webhook %s: attempt %d failed (%s); retrying in %.1f s",
                    self.url,
                    attempt,
                    reason,
                    delay,
                )
                await asyncio.sleep(delay)  # backoff between retries, not a synchronisation
                delay *= 2
            else:
                self.counts["failed"] += 1
                log.warning(
                    "webhook %s: gave up on a %s alert after %d attempts (%s)",
                    self.url,
                    alert.kind,
                    ATTEMPTS,
                    reason,
                )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
