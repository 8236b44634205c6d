"""thoxd/guards/timeouts.py: the deadlines for request headers and bodies.

In-process for the body deadline, and on a real socket against the `guarded` daemon
(tests/guards/conftest.py) for both. Nothing here measures time: each test asserts who closed
the connection and what it said, and a client that waits for that gives up only after CAP
seconds, far past the 1 s deadlines, which then fails the test as "the server never closed".
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from tests.conftest import Daemon
from tests.guards.conftest import HEADER_TIMEOUT
from tests.inproc import make_app, request
from thoxd.catalog.entries import Catalog
from thoxd.errors import RequestTimeout
from thoxd.guards.timeouts import raw_response

CAP = 30.0  # seconds a client waits for the server to close before calling it a failure
JSON = {"Content-Type": "application/json"}


def test_body_timeout_in_process(tmp_path: Path, catalog: Catalog) -> None:
    app = make_app(tmp_path, catalog, body_timeout_seconds=0.5)
    resumed = []

    async def stalled() -> AsyncIterator[bytes]:
        yield b'{"model": "thox-coder", '
        await asyncio.sleep(CAP)
        resumed.append(True)
        yield b"}"

    response = asyncio.run(request(app, "POST", "/v1/completions", content=stalled(), headers=JSON))
    assert response.status_code == 408
    assert response.json()["error"]["code"] == "request_timeout"
    assert response.headers["connection"] == "close"
    assert resumed == []  # answered while the body was still stalled


def test_raw_response_is_one_closing_http_response() -> None:
    raw = raw_response(RequestTimeout("too slow"))
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 408 Request Timeout"
    assert lines.count("connection: close") == 1  # the error's own header is not repeated
    assert f"content-length: {len(body)}" in lines
    assert b'"code": "request_timeout"' in body


# -- on a real socket ------------------------------------------------------------------------


def held(sock: socket.socket, dribble: bytes = b"") -> tuple[bool, bytes, int]:
    """Feed `dribble` one byte per 0.2 s, then wait. Whether the server closed the connection
    (False: still open after CAP seconds), what it said, and how many bytes went out."""
    start = time.monotonic()
    sock.settimeout(0.2)
    answer = b""
    sent = 0
    while time.monotonic() - start < CAP:
        if sent < len(dribble):
            try:
                sock.send(dribble[sent : sent + 1])
            except OSError:
                return True, answer, sent
            sent += 1
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            return True, answer, sent
        if not data:
            return True, answer, sent
        answer += data
    return False, answer, sent


def test_silent_connection_closed(guarded: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        closed, answer, _ = held(sock)
    assert closed
    assert answer == b""  # nothing came, so there is nothing to answer


def test_dribbled_headers_cut_off(guarded: Daemon) -> None:
    head = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{guarded.port}\r\nUser-Agent: slow\r\n\r\n"
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        closed, answer, _ = held(sock, head.encode())
    assert closed
    # A 408, never the /health answer the whole head would have got.
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"request_timeout"' in answer
    assert answer.count(b"HTTP/1.1 ") == 1


def test_stalled_body_cut_off(guarded: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            b'\r\nContent-Length: 100\r\n\r\n{"mod'
        )
        closed, answer, _ = held(sock)
    assert closed
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_body_dribbled_after_an_early_answer_cut_off(guarded: Daemon) -> None:
    # A 404 goes out before the body is read; the rest of the body must not trickle forever.
    body = b"x" * 100
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(
            b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n"
        )
        closed, answer, sent = held(sock, body)
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert closed
    assert sent < len(body)  # the server ended it, not the end of what the client had to send


def test_prompt_clients_unaffected(guarded: Daemon) -> None:
    with httpx.Client(base_url=guarded.url) as http:  # one kept-alive connection
        first = http.get("/v1/models")
        time.sleep(HEADER_TIMEOUT * 1.5)  # idle between requests is keep-alive's business
        second = http.get("/v1/models")
    assert first.status_code == second.status_code == 200
