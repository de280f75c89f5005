"""SSE framing: byte for byte what OpenAI sends."""

from __future__ import annotations

import json

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pagemesh.services.gateway.sse import DONE, SSEWriter, encode_event


def test_event_is_data_line_compact_json_blank_line() -> None:
    frame = encode_event({"a": 1, "b": [1, 2], "c": None})
    assert frame == b'data: {"a":1,"b":[1,2],"c":null}\n\n'


def test_event_keeps_utf8_raw() -> None:
    frame = encode_event({"t": "héllo 日本 🎉"})
    assert frame == 'data: {"t":"héllo 日本 🎉"}\n\n'.encode()
    assert json.loads(frame[len(b"data: ") : -2]) == {"t": "héllo 日本 🎉"}


def test_newlines_in_content_stay_escaped_inside_one_data_line() -> None:
    frame = encode_event({"t": "a\nb\r\n\n"})
    assert frame.count(b"\n") == 2 and frame.endswith(b"\n\n")


def test_done_frame() -> None:
    assert DONE == b"data: [DONE]\n\n"


async def test_writer_headers_and_body() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        sse = SSEWriter(request)
        await sse.send({"x": 1})
        await sse.send_many([{"y": 2}, {"z": "é"}])
        await sse.done()
        return sse.response

    app = web.Application()
    app.router.add_get("/", handler)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/")
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-cache"
        body = await resp.read()
    assert body == (
        b'data: {"x":1}\n\n' + b'data: {"y":2}\n\n' + 'data: {"z":"é"}\n\n'.encode() + DONE
    )
