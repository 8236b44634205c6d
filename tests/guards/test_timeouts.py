"""thoxd/guards/timeouts.py: the deadlines for request headers and bodies.

In-process for the body deadline, and on a real socket against the `guarded` daemon
(tests/guards/conftest.py) for both.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from tests.conftest import Daemon
from tests.guards.conftest import BODY_TIMEOUT, HEADER_TIMEOUT
from tests.inproc import make_app, request
from thoxd.catalog.entries import Catalog


def test_body_timeout_in_process(tmp_path: Path, catalog: Catalog) -> None:
    app = make_app(tmp_path, catalog, body_timeout_seconds=0.5)

    async def stalled() -> AsyncIterator[bytes]:
        yield b'{"model": "thox-coder", '
        await asyncio.sleep(30)

    start = time.monotonic()
    response = asyncio.run(request(app, "POST", "/v1/completions", content=stalled()))
    assert response.status_code == 408
    assert response.json()["error"]["code"] == "request_timeout"
    assert response.headers["connection"] == "close"
    assert time.monotonic() - start < 5


# -- on a real socket ------------------------------------------------------------------------


def held_for(sock: socket.socket, dribble: bytes = b"", cap: float = 8.0) -> tuple[float, bytes]:
    """Feed `dribble` one byte per 0.2 s; how long until the server closes, and what it said."""
    start = time.monotonic()
    sock.settimeout(0.2)
    answer = b""
    i = 0
    while time.monotonic() - start < cap:
        if i < len(dribble):
            try:
                sock.send(dribble[i : i + 1])
            except OSError:
                break
            i += 1
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not data:
            break
        answer += data
    return time.monotonic() - start, answer


def test_silent_connection_closed(guarded: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        took, answer = held_for(sock)
    assert HEADER_TIMEOUT * 0.8 < took < HEADER_TIMEOUT + 2, took
    assert answer == b""


def test_dribbled_headers_cut_off(guarded: Daemon) -> None:
    head = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{guarded.port}\r\nUser-Agent: slow\r\n\r\n"
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        took, answer = held_for(sock, head.encode())
    assert took < HEADER_TIMEOUT + 2, took
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"request_timeout"' in answer


def test_stalled_body_cut_off(guarded: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            b'\r\nContent-Length: 100\r\n\r\n{"mod'
        )
        took, answer = held_for(sock)
    assert took < BODY_TIMEOUT + 2, took
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_body_dribbled_after_an_early_answer_cut_off(guarded: Daemon) -> None:
    # A 404 goes out before the body is read; the rest of the body must not trickle forever.
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n")
        took, answer = held_for(sock, b"x" * 100)
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert took < HEADER_TIMEOUT + 2, took


def test_prompt_clients_unaffected(guarded: Daemon) -> None:
    with httpx.Client(base_url=guarded.url) as http:  # one kept-alive connection
        first = http.get("/v1/models")
        time.sleep(HEADER_TIMEOUT * 1.5)  # idle between requests is keep-alive's business
        second = http.get("/v1/models")
    assert first.status_code == second.status_code == 200
