"""thoxd/guards/framing.py: a request with both Transfer-Encoding and Content-Length is refused
and its connection closed. In-process around a bare app, and on a real socket against the
`guarded` daemon (tests/guards/conftest.py) with a request smuggled behind it."""

from __future__ import annotations

import asyncio
import socket

import pytest
from starlette.types import Message, Receive, Scope, Send

from tests.conftest import Daemon
from thoxd.guards.framing import FramingGuard


async def reached(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def call(headers: list[tuple[bytes, bytes]]) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    asyncio.run(FramingGuard(reached)(scope, receive, send))
    return sent


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-length", b"2")],
        [(b"transfer-encoding", b"chunked")],
        [],
    ],
)
def test_one_way_of_framing_passes(headers: list[tuple[bytes, bytes]]) -> None:
    assert call(headers)[0]["status"] == 204


def test_both_ways_are_refused_with_close() -> None:
    start, body = call([(b"content-length", b"2"), (b"transfer-encoding", b"chunked")])
    assert start["status"] == 400
    assert (b"connection", b"close") in start["headers"]
    assert b'"code":"ambiguous_framing"' in body["body"]


def read_all(sock: socket.socket) -> tuple[bool, bytes]:
    """Everything the server sends; whether it closed (False: still open after 30 s)."""
    sock.settimeout(30)
    answer = b""
    try:
        while data := sock.recv(4096):
            answer += data
    except TimeoutError:
        return False, answer
    return True, answer


def test_smuggling_shape_refused_on_the_wire(guarded: Daemon) -> None:
    # h11 reads the chunked body (empty) and then a second request; a proxy trusting
    # Content-Length would have passed those bytes on as the POST's body.
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(head % (len(b"0\r\n\r\n") + len(smuggled)) + b"0\r\n\r\n" + smuggled)
        closed, answer = read_all(sock)
    assert closed
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b'"ambiguous_framing"' in answer
    assert answer.count(b"HTTP/1.1 ") == 1  # the smuggled request was never answered
