"""Graceful shutdown: thoxd/guards/shutdown.py in process, then SIGTERM to a real daemon
mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import Daemon
from thoxd.guards.shutdown import Shutdown, ShutdownGate

# -- in process ----------------------------------------------------------------------------------


def test_drain_waits_for_running_requests_up_to_the_grace_period() -> None:
    async def scenario() -> None:
        shutdown = Shutdown()
        assert await shutdown.drain(60)  # nothing running: done (the test would hang otherwise)
        assert shutdown.draining

        with shutdown.track():
            assert not await shutdown.drain(0.3)  # still running when the grace period ends
            assert not await shutdown.drain(60, give_up=lambda: True)  # a second Ctrl+C

        release = asyncio.Event()
        task = asyncio.create_task(release.wait())
        shutdown.track_task(task)
        assert shutdown.active == 1
        asyncio.get_running_loop().call_soon(release.set)
        assert await shutdown.drain(60)  # ends when the request does
        assert task.done() and shutdown.active == 0

    asyncio.run(scenario())


def test_end_runs_what_is_registered_then_and_later() -> None:
    async def scenario() -> None:
        shutdown = Shutdown()
        calls: list[str] = []

        async def going_away() -> None:
            await asyncio.sleep(0.05)
            calls.append("async")

        shutdown.at_end(lambda: calls.append("sync"))
        shutdown.at_end(going_away)
        forget = shutdown.at_end(lambda: calls.append("forgotten"))
        forget()
        await shutdown.end()
        assert sorted(calls) == ["async", "sync"] and shutdown.ended
        shutdown.at_end(lambda: calls.append("late"))  # registered after the end: at once
        assert calls[-1] == "late"

    asyncio.run(scenario())


def test_the_gate_answers_503_while_draining() -> None:
    shutdown = Shutdown()
    seen: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(shutdown.active)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=ShutdownGate(app, shutdown))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/health")).status_code == 200
            assert seen == [1] and shutdown.active == 0  # counted while it ran
            shutdown.draining = True
            refused = await client.get("/v1/models")
        assert refused.status_code == 503 and seen == [1]
        assert refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["retry-after"] == "5"
        assert refused.headers["connection"] == "close"

    asyncio.run(scenario())


# -- SIGTERM to a real daemon -------------------------------------------------------------------

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy, it counts on and never stops by itself
LONG = {"model": "thox-coder", "prompt": COUNTING, "temperature": 0, "max_tokens": 4000}


class Stream:
    """One SSE response, read to its end: every `data:` payload with the time it came."""

    def __init__(self, client: httpx.AsyncClient, body: dict[str, Any]) -> None:
        self.events: list[tuple[float, str]] = []
        self.status = 0
        self.task = asyncio.create_task(self._read(client, body))

    async def _read(self, client: httpx.AsyncClient, body: dict[str, Any]) -> None:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            self.status = r.status_code
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    self.events.append((time.monotonic(), line[6:]))

    async def first_token(self) -> None:
        while not self.events:
            assert not self.task.done(), self.status
            await asyncio.sleep(0.01)


class Socket:
    """A /v1/stream connection: every event it gets, and how it closed."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                self.events.append(json.loads(message))
        except ConnectionClosed:
            pass
        self.close_code = self.ws.close_code

    async def first_token(self) -> None:
        while not self.events:
            assert not self.task.done()
            await asyncio.sleep(0.01)


async def _until(check: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Poll `check` until it is true; when it became so."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return time.monotonic()
        await asyncio.sleep(0.02)
    raise AssertionError("not within the time")


# Endless generations, SIGTERM, a short grace period: what is still running gets ended.

GRACE = 3.0


async def _sigterm_mid_stream(daemon: Daemon) -> dict[str, Any]:
    async with (
        httpx.AsyncClient(base_url=daemon.url, timeout=60) as client,
        httpx.AsyncClient(base_url=daemon.url, timeout=10) as idle,
        connect(daemon.url.replace("http", "ws") + "/v1/stream") as ws,
    ):
        assert (await idle.get("/health")).status_code == 200  # a connection kept alive
        sse = Stream(client, LONG)
        plain = asyncio.create_task(client.post("/v1/completions", json=LONG))  # not streamed
        socket = Socket(ws)
        await ws.send(json.dumps({"id": "long", **LONG}))
        await sse.first_token()
        await socket.first_token()

        os.kill(daemon.proc.pid, signal.SIGTERM)
        sigterm = time.monotonic()

        async def refused_on_kept_connection() -> bool:
            response = await idle.get("/health")
            if response.status_code == 200:
                return False
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "shutting_down"
            return True

        draining = await _until(refused_on_kept_connection, GRACE)

        async def new_connections_refused() -> bool:
            try:
                async with httpx.AsyncClient(base_url=daemon.url, timeout=2) as fresh:
                    await fresh.get("/health")
            except httpx.ConnectError:
                return True
            return False

        await _until(new_connections_refused, 1)
        await ws.send(json.dumps({"id": "late", **LONG}))

        await asyncio.wait_for(sse.task, GRACE + 30)  # one decode step past the grace period
        await asyncio.wait_for(socket.task, GRACE + 30)
        plain_response = await asyncio.wait_for(plain, GRACE + 30)
        code = await asyncio.to_thread(daemon.proc.wait, 30)
    return {
        "sigterm": sigterm,
        "draining": draining,
        "sse": sse,
        "plain": plain_response,
        "socket": socket,
        "code": code,
    }


@pytest.mark.slow
def test_sigterm_ends_streams_after_the_grace_period(tmp_path: Path, models_dir: Path) -> None:
    daemon = Daemon(tmp_path, models_dir, "--shutdown-grace-seconds", str(GRACE))
    try:
        daemon.wait_ready()
        run = asyncio.run(_sigterm_mid_stream(daemon))
    finally:
        daemon.stop()
    sigterm, draining = run["sigterm"], run["draining"]

    # SSE: tokens until the grace period was over, then a final error event, then the end (no
    # [DONE]); new requests were refused before that (during the grace period).
    sse: Stream = run["sse"]
    assert sse.status == 200
    when, last = sse.events[-1]
    assert json.loads(last)["error"]["code"] == "shutting_down", sse.events[-3:]
    assert "[DONE]" not in [data for _, data in sse.events]
    assert sigterm < draining < when
    assert sum(1 for t, _ in sse.events if t > draining) > 1  # it kept streaming meanwhile
    assert "grace period over: ending" in daemon.log()

    # A plain (not streamed) request still running: 503 shutting_down instead of its answer.
    plain: httpx.Response = run["plain"]
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "shutting_down"

    # WebSocket: a new request refused at once, the running one ended, then close 1001.
    socket: Socket = run["socket"]
    errors = [e for e in socket.events if e["type"] == "error"]
    assert [(e["id"], e["error"]["code"]) for e in errors] == [
        ("late", "shutting_down"),
        ("long", "shutting_down"),
    ], socket.events[-3:]
    assert not [e for e in socket.events if e["type"] == "done"]
    assert socket.close_code == 1001

    assert run["code"] == 0, daemon.log()


# A short generation in flight at SIGTERM, a long grace period: it finishes normally, then the
# daemon exits without waiting out the rest of the grace period. With one slot, the short request
# waits in the queue behind an endless one until the client drops that one after the shutdown has
# begun: in flight at SIGTERM, however fast or slow the box is.

SHORT = {**LONG, "max_tokens": 6}
LONG_GRACE = 60.0


async def _sigterm_with_a_short_generation_waiting(daemon: Daemon) -> dict[str, Any]:
    async with (
        httpx.AsyncClient(base_url=daemon.url, timeout=60) as client,
        httpx.AsyncClient(base_url=daemon.url, timeout=10) as idle,
    ):
        endless = Stream(client, LONG)
        await endless.first_token()
        short = Stream(client, SHORT)

        async def short_waits() -> bool:
            models = (await idle.get("/health")).json()["models"]
            return bool(models["smollm2-135m-instruct"]["waiting"] == 1)

        await _until(short_waits, 30)
        os.kill(daemon.proc.pid, signal.SIGTERM)
        sigterm = time.monotonic()

        async def draining() -> bool:
            return (await idle.get("/health")).status_code == 503

        draining_at = await _until(draining, 5)
        endless.task.cancel()  # the client goes away: its slot frees, the short one starts
        await asyncio.wait_for(short.task, LONG_GRACE)
        code = await asyncio.to_thread(daemon.proc.wait, LONG_GRACE)
    return {
        "sigterm": sigterm,
        "draining": draining_at,
        "short": short,
        "code": code,
    }


@pytest.mark.slow
def test_a_short_generation_in_flight_at_sigterm_finishes_normally(
    tmp_path: Path, models_dir: Path
) -> None:
    grace = str(LONG_GRACE)
    daemon = Daemon(tmp_path, models_dir, "--slots", "1", "--shutdown-grace-seconds", grace)
    try:
        daemon.wait_ready()
        run = asyncio.run(_sigterm_with_a_short_generation_waiting(daemon))
    finally:
        daemon.stop()
    running = re.search(r"shutting down: (\d+) requests running", daemon.log())
    assert running and int(running.group(1)) >= 2, daemon.log()  # the endless one and the short
    short: Stream = run["short"]
    assert short.status == 200
    assert short.events[0][0] > run["draining"]  # it started generating after the shutdown began
    assert short.events[-1][1] == "[DONE]"  # and ended as if nothing happened
    last_chunk = json.loads(short.events[-2][1])
    assert last_chunk["choices"][0]["finish_reason"] == "length", short.events[-2:]
    # Then the daemon exited 0 at once, not at the end of the grace period.
    assert run["code"] == 0, daemon.log()
    assert "grace period over" not in daemon.log()


# -- what never stops in time ---------------------------------------------------------------------


def _post_in_background(url: str, body: dict[str, Any]) -> None:
    """A request whose answer nobody waits for (the daemon goes away under it)."""

    def post() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(url, json=body, timeout=120)

    threading.Thread(target=post, daemon=True).start()


def _sigterm_once(daemon: Daemon, ready: Callable[[], bool]) -> int:
    """SIGTERM once `ready()` holds (60 s at most: past that it never did); the exit code."""
    deadline = time.monotonic() + 60
    while not ready():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    os.kill(daemon.proc.pid, signal.SIGTERM)
    return daemon.proc.wait(60)


@pytest.mark.slow
def test_sigterm_during_a_long_embedding_exits_cleanly(tmp_path: Path, models_dir: Path) -> None:
    """Embeddings run a chunk at a time, so the engine thread stops between two chunks; it
    used to sit in one long job while its model was freed under it (SIGSEGV)."""
    daemon = Daemon(tmp_path, models_dir, "--shutdown-grace-seconds", "0")
    try:
        daemon.wait_ready()
        body = {"model": "thox-coder", "input": ["word " * 7000] * 3}
        _post_in_background(daemon.url + "/v1/embeddings", body)
        code = _sigterm_once(daemon, lambda: daemon.busy() > 0)
    finally:
        daemon.stop()
    assert code == 0, daemon.log()


@pytest.mark.slow
def test_a_decode_that_outlives_the_shutdown_ends_the_process_deliberately(
    tmp_path: Path, models_dir: Path
) -> None:
    """A decode that never returns (injected): the model is not freed under it, and the process
    ends with exit code 0 and says why, instead of dying of a signal."""
    daemon = Daemon(
        tmp_path, models_dir, "--shutdown-grace-seconds", "0",
        module="tests.faulty_daemon",
        env={"THOXD_TEST_FAULT": "hang-decode", "THOXD_TEST_STOP_TIMEOUT": "0.5"},
    )  # fmt: skip
    try:
        daemon.wait_ready()
        _post_in_background(daemon.url + "/v1/completions", {**LONG, "max_tokens": 4})
        code = _sigterm_once(daemon, lambda: "this decode never returns" in daemon.log())
    finally:
        daemon.stop()
    log = daemon.log()
    assert code == 0, log
    assert "the engine thread did not stop" in log
    assert "exiting without teardown" in log
