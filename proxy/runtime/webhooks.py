"""The alert webhook in force: follows `[alerts] webhook` across reloads."""

from __future__ import annotations

import asyncio

import aiohttp

from proxy.monitoring.alerts import Alerts
from proxy.monitoring.webhook import WebhookSender
from proxy.runtime.tasks import Tasks

LAST_ALERTS_S = 2.0  # at shutdown, how long queued alerts may take to go out


class Webhooks:
    """Starts a sender for the configured URL, and retires it when the URL changes."""

    def __init__(self, alerts: Alerts, http: aiohttp.ClientSession, tasks: Tasks) -> None:
        self._alerts = alerts
        self._http = http
        self._tasks = tasks
        self.sender: WebhookSender | None = None

    def attach(self, url: str) -> None:
        if self.sender is not None and self.sender.url != url:
            self._alerts.unlisten(self.sender.submit)
            self._tasks.spawn(self.sender.close())
            self.sender = None
        if url and self.sender is None:
            self.sender = WebhookSender(url, self._http)
            self._alerts.listen(self.sender.submit)
            self.sender.start()

    def counts(self) -> dict[str, int]:
        return {} if self.sender is None else dict(self.sender.counts)

    async def close(self) -> None:
        if self.sender is None:
            return
        try:
            await asyncio.wait_for(self.sender.idle(), timeout=LAST_ALERTS_S)
        except TimeoutError:
            pass
        await self.sender.close()
