"""A second mlproxy used as a remote upstream, with a gate that can hold its infer answers."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from proxy.http.data import create_data_plane
from proxy.runtime.serving import Serving


class GatedUpstream:
    """Serves a real mlproxy data plane; while `gate` is clear, infer calls wait for it."""

    def __init__(self, serving: Serving) -> None:
        self.plane = create_data_plane(serving)
        self.gate = asyncio.Event()
        self.gate.set()
        self.received = 0
        self.answered = 0
        self.first_received = asyncio.Event()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "POST":
            self.received += 1
            self.first_received.set()
            await self.gate.wait()
            resp = await self.plane.handle(request)
            self.answered += 1
            return resp
        return await self.plane.handle(request)


async def start_upstream(
    aiohttp_raw_server: Any, serving: Serving
) -> tuple[GatedUpstream, Any, str]:
    up = GatedUpstream(serving)
    server = await aiohttp_raw_server(up.handle)
    return up, server, f"http://127.0.0.1:{server.port}/v2/models/cancer"
