"""Hostile clients over raw sockets: bytes that are not UTF-8, encodings that lie, ids that only
look generated. Each gets a 4xx that says what was wrong, and the next request is served."""

from __future__ import annotations

import asyncio
import gzip
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.http.admin import create_admin_app

from .helpers import infer_body, model_section

CANARY = "[models.cancer.canary]\nweights = { v1 = 50, v2 = 50 }\n"


async def raw(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One request written byte for byte; (status, body) of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"\r\n\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def request(path: str, body: bytes, *headers: bytes) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1".encode(),
        b"Host: 127.0.0.1",
        b"Content-Type: application/json",
        b"Connection: close",
        f"Content-Length: {len(body)}".encode(),
        *headers,
    ]
    return b"\r\n".join(lines)


@pytest.fixture
async def canary(start: Any, write_config: Any, model_repo: Path) -> Any:
    extra = 'sticky_key = "x-user-id"\n'
    client, serving = await start(
        write_config(model_section(mode="canary", repo=model_repo, extra=extra) + CANARY)
    )
    return client, serving


async def test_a_sticky_key_that_is_not_utf8_is_routed_like_any_other(
    canary: Any, cancer_rows: Any
) -> None:
    client, _ = canary
    body = orjson.dumps(infer_body(cancer_rows[:1]))
    answers = set()
    for _ in range(3):
        status, reply = await raw(
            client.port, request("/v2/models/cancer/infer", body, b"x-user-id: \xff\xfe-user"), body
        )
        assert status == 200, reply
        answers.add(orjson.loads(reply)["model_version"])
    assert len(answers) == 1  # the same raw bytes: the same version, every time


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate", b"br"])
@pytest.mark.parametrize("path", ["/v2/models/cancer/infer", "/v2/models/cancer/feedback"])
async def test_a_body_that_is_not_in_its_content_encoding_is_a_400(
    canary: Any, cancer_rows: Any, encoding: bytes, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = canary
    body = orjson.dumps(infer_body(cancer_rows[:1]))
    status, reply = await raw(
        client.port, request(path, body, b"Content-Encoding: " + encoding), body
    )
    assert status == 400, reply
    assert "Content-Encoding" in orjson.loads(reply)["error"]
    # a client's mistake logs no traceback (neither ours nor aiohttp's draining the body)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    # ...and a body that really is gzip is read
    packed = gzip.compress(body)
    status, reply = await raw(
        client.port,
        request("/v2/models/cancer/infer", packed, b"Content-Encoding: gzip"),
        packed,
    )
    assert status == 200, reply


@pytest.mark.parametrize("tail", ["\u00b2", "\u2460", "7" * 4400, "\uff11"])
async def test_a_feedback_id_that_only_looks_generated_is_unknown(canary: Any, tail: str) -> None:
    client, serving = canary
    tag = serving.ids.new()[0].partition("-")[2]  # a real tag, after digits that are not ASCII
    resp = await client.post("/v2/models/cancer/feedback", json={"id": f"{tail}-{tag}", "label": 1})
    assert resp.status == 404, await resp.text()
    assert "no stored prediction" in (await resp.json())["error"]


async def test_an_authorization_header_that_is_not_utf8_is_a_401(
    canary: Any, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, serving = canary
    monkeypatch.setenv("MLPROXY_ADMIN_TOKEN", "s3cret-token")
    admin = await aiohttp_server(create_admin_app(serving))
    status, reply = await raw(
        admin.port, request("/admin/reload", b"", b"Authorization: Bearer \xff\xfe")
    )
    assert status == 401, reply
    status, _ = await raw(
        admin.port, request("/admin/reload", b"", b"Authorization: Bearer s3cret-token")
    )
    assert status == 200
