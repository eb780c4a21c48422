"""Upstreams for remote versions, all real aiohttp servers on 127.0.0.1: a second mlproxy with a
gate that can hold its infer answers (an upstream that hangs), one started later on a port
chosen in advance (an upstream that comes up after the proxy), a port where nothing listens
(an upstream that is down), a server that answers fixed metadata (a schema that differs), and
one that dies in the middle of every infer call."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from proxy.http.data import create_data_plane
from proxy.runtime.serving import Serving

from .helpers import free_port


class GatedUpstream:
    """Serves a real mlproxy data plane; while `gate` is clear, infer calls wait for it.
    `received` counts the infer calls that arrived, `metadata_calls` the GETs."""

    def __init__(self, serving: Serving) -> None:
        self.plane = create_data_plane(serving)
        self.gate = asyncio.Event()
        self.gate.set()
        self.received = 0
        self.answered = 0
        self.metadata_calls = 0
        self.first_received = asyncio.Event()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "POST":
            self.received += 1
            self.first_received.set()
            await self.gate.wait()
            resp = await self.plane.handle(request)
            self.answered += 1
            return resp
        self.metadata_calls += 1
        return await self.plane.handle(request)


async def start_upstream(
    aiohttp_raw_server: Any, serving: Serving, *, port: int | None = None
) -> tuple[GatedUpstream, Any, str]:
    """A GatedUpstream serving `serving` (on `port`, if given: an upstream coming up where the
    proxy already expects it)."""
    up = GatedUpstream(serving)
    server = await aiohttp_raw_server(up.handle, port=port)
    return up, server, f"http://127.0.0.1:{server.port}/v2/models/cancer"


def down_url() -> tuple[int, str]:
    """A port nothing listens on (connections are refused) and the model URL on it."""
    port = free_port()
    return port, f"http://127.0.0.1:{port}/v2/models/cancer"


class MetadataOnly:
    """An Open Inference Protocol server that answers `meta` to GET and 500 to infer."""

    def __init__(self, meta: Any) -> None:
        self.meta = meta
        self.infer_calls = 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "POST":
            self.infer_calls += 1
            return web.Response(status=500, text="not a model")
        return web.Response(body=orjson.dumps(self.meta), content_type="application/json")


async def start_metadata_only(
    aiohttp_raw_server: Any, meta: Any, *, port: int | None = None
) -> tuple[MetadataOnly, str]:
    server_obj = MetadataOnly(meta)
    server = await aiohttp_raw_server(server_obj.handle, port=port)
    return server_obj, f"http://127.0.0.1:{server.port}/v2/models/cancer"


class DyingUpstream:
    """Serves a real mlproxy data plane's metadata, then dies in the middle of every infer call:
    `how = "after_request"` reads the whole request and closes the connection unanswered;
    `how = "mid_response"` sends the status line, headers and 16 of the 1,000 body bytes it
    announced, then closes."""

    def __init__(self, serving: Serving, how: str) -> None:
        assert how in ("after_request", "mid_response")
        self.plane = create_data_plane(serving)
        self.how = how
        self.received = 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method != "POST":
            return await self.plane.handle(request)
        await request.read()
        self.received += 1
        transport = request.transport
        assert transport is not None
        if self.how == "after_request":
            transport.close()
            return web.Response()  # never written: the connection is gone
        resp = web.StreamResponse(headers={"Content-Length": "1000"})
        resp.content_type = "application/json"
        await resp.prepare(request)
        await resp.write(b'{"id": "1", "mod')
        transport.close()
        return resp


async def start_dying_upstream(
    aiohttp_raw_server: Any, serving: Serving, how: str
) -> tuple[DyingUpstream, Any, str]:
    """A DyingUpstream serving `serving`'s metadata (an upstream that dies mid-request)."""
    up = DyingUpstream(serving, how)
    server = await aiohttp_raw_server(up.handle)
    return up, server, f"http://127.0.0.1:{server.port}/v2/models/cancer"
