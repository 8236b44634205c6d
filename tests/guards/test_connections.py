"""thoxd/guards/connections.py: the open file limit, the cap on connections below it, and a
flood of refusals logged once rather than once per connection.

The cap is tested on a real socket against a daemon started with a low open file limit (which it
raises) and `--max-connections 4`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.conftest import Daemon
from tests.guards.conftest import absent_model_daemon
from thoxd.guards.connections import (
    BACKLOG,
    FD_RESERVE,
    MIN_CONNECTIONS,
    ConnectionLimit,
    connection_cap,
)

CAP = 4
EXTRA = 5
HARD_LIMIT = 4096
# Runs the daemon with a soft open file limit of 64 under a hard one of 4096.
_LOW_NOFILE = (
    "import os, resource, sys\n"
    f"resource.setrlimit(resource.RLIMIT_NOFILE, (64, {HARD_LIMIT}))\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def test_the_soft_file_limit_is_raised_to_the_hard_one() -> None:
    code = (
        "import resource\n"
        "from thoxd.guards.connections import raise_fd_limit\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    returned, soft, hard = out.stdout.split()
    assert returned == soft == hard


def test_the_cap_leaves_room_below_the_file_limit(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "thoxd.security"):
        assert connection_cap(1024, 65536) == 1024
        assert caplog.records == []
        assert connection_cap(1024, 1024) == 1024 - FD_RESERVE - 4 * BACKLOG
        assert connection_cap(1024, 100) == MIN_CONNECTIONS
    assert len(caplog.records) == 2
    assert "max_connections lowered from 1024" in caplog.records[0].getMessage()


class FakeTransport(asyncio.WriteTransport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True


def test_a_flood_is_logged_once_then_summed_up(caplog: pytest.LogCaptureFixture) -> None:
    async def flood() -> list[str]:
        loop = asyncio.get_running_loop()
        limit = ConnectionLimit(CAP, every=0.05)
        transports = [FakeTransport() for _ in range(EXTRA)]
        for transport in transports:
            limit.refuse(transport, loop)
        assert all(t.closed and t.written.startswith(b"HTTP/1.1 503 ") for t in transports)
        assert b'"too_many_connections"' in transports[0].written
        assert limit.refused == EXTRA
        logged = [r.getMessage() for r in caplog.records]
        assert len(logged) == 1  # the first refusal, at once; the rest counted
        deadline = time.monotonic() + 30
        while limit.flooding:  # the summary, then a quiet interval ends the flood
            assert time.monotonic() < deadline, "the flood never ended"
            await asyncio.sleep(0.01)
        limit.refuse(FakeTransport(), loop)  # a new flood: logged at once again
        return [r.getMessage() for r in caplog.records]

    with caplog.at_level(logging.WARNING, "thoxd.security"):
        logged = asyncio.run(flood())
    assert len(logged) == 3, logged
    assert logged[0].startswith("refused a connection: 4 are open")
    assert logged[1].startswith(f"refused {EXTRA - 1} more connections")
    assert logged[2].startswith("refused a connection: 4 are open")


# -- on a real socket ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = absent_model_daemon(
        tmp_path_factory.mktemp("capped"),
        "--max-connections", str(CAP),
        "--header-timeout-seconds", "300",  # admitted connections stay open while we count
        wrapper=(sys.executable, "-c", _LOW_NOFILE),
    )  # fmt: skip
    try:
        yield d
    finally:
        d.stop()


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


def silent_and_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return not sock.recv(1)  # b"": closed by the server
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)


def fresh_health(daemon: Daemon) -> dict[str, object] | None:
    """/health on a new connection; None while the server still refuses connections."""
    try:
        response = httpx.get(daemon.url + "/health", timeout=30)
    except httpx.TransportError:  # refused and closed before the request went out
        return None
    body = response.json()
    assert isinstance(body, dict)
    if isinstance(body.get("error"), dict):
        assert body["error"]["code"] == "too_many_connections"
        return None
    return body


def ping(ws: ClientConnection) -> object:
    ws.send('{"type": "ping"}')
    return json.loads(ws.recv(timeout=30))


def test_connections_past_the_cap_are_refused(capped: Daemon) -> None:
    address = ("127.0.0.1", capped.port)
    with contextlib.ExitStack() as held:
        ws = held.enter_context(connect(f"ws://127.0.0.1:{capped.port}/v1/stream"))
        assert ping(ws) == {"type": "pong"}
        # The WebSocket and CAP - 1 silent connections fill the cap; the server takes
        # connections in the order they came, so exactly the next EXTRA are refused.
        admitted = [held.enter_context(socket.create_connection(address)) for _ in range(CAP - 1)]
        for _ in range(EXTRA):
            with socket.create_connection(address) as extra:
                closed, answer = read_all(extra)
            assert closed
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert b'"too_many_connections"' in answer
        assert all(silent_and_open(sock) for sock in admitted)
        assert ping(ws) == {"type": "pong"}  # the WebSocket kept its place
    # Once they are gone, a fresh connection is served again (the server may take a moment to
    # see the closes: it is asked again until then).
    deadline = time.monotonic() + 30
    while (health := fresh_health(capped)) is None:
        assert time.monotonic() < deadline, "connections were not released"
        time.sleep(0.1)
    assert health["status"] == "error"  # /health itself: its model cannot load
    log = capped.log_path.read_text()
    assert "at most 4 connections at once (open file limit 4096)" in log  # raised from 64
    refusals = [line for line in log.splitlines() if "refused" in line and "connection" in line]
    assert len(refusals) == 1, refusals
