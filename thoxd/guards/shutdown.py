"""Graceful shutdown as the request handlers see it: running, draining, ended.

    running ──SIGTERM──▶ draining ──no request left, or the grace period is over──▶ ended

- draining: the listening socket is closed; new requests on connections still open get 503
  `shutting_down` (`ShutdownGate`, and the WebSocket endpoint for its messages); requests already
  running go on.
- ended: whatever still runs is ended: SSE streams get a final `shutting_down` error event,
  WebSockets one `shutting_down` error per request in flight and then close 1001 (going away).

`thoxd.server` drives the phases (`drain`, then `end`); handlers read `draining` / `ended`, count
their requests with `track()` / `track_task()` and say what to do at the end with `at_end()`.
Plain flags and callbacks rather than asyncio primitives: one Shutdown may outlive an event loop
(tests run an app under several).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from thoxd.errors import ShuttingDown

logger = logging.getLogger("thoxd.shutdown")

OnEnd = Callable[[], Awaitable[None] | None]
POLL_SECONDS = 0.05


def shutting_down() -> ShuttingDown:
    return ShuttingDown("The server is shutting down. Retry in a few seconds.")


class Shutdown:
    """Where the daemon is in its shutdown, and what to end when the grace period is over."""

    def __init__(self) -> None:
        self.draining = False
        self.ended = False
        self.active = 0  # requests running: HTTP requests, WebSocket requests
        self._on_end: dict[object, OnEnd] = {}
        self._late: set[asyncio.Future[None]] = set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count one running request for as long as the block runs."""
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    def track_task(self, task: asyncio.Task[Any]) -> None:
        """Count one running request until `task` is done."""
        self.active += 1
        task.add_done_callback(self._untrack)

    def _untrack(self, task: asyncio.Task[Any]) -> None:
        self.active -= 1

    def at_end(self, callback: OnEnd) -> Callable[[], None]:
        """Call `callback` when the shutdown ends running work (at once if it already has); it
        may return an awaitable, which `end()` waits for. Returns a function that forgets it."""
        if self.ended:
            late = _call(callback)
            if late is not None:  # keep a reference until it is done
                self._late.add(late)
                late.add_done_callback(self._late.discard)
        token = object()
        self._on_end[token] = callback

        def forget() -> None:
            self._on_end.pop(token, None)

        return forget

    async def drain(self, grace: float, *, give_up: Callable[[], bool] = lambda: False) -> bool:
        """Refuse new requests; wait up to `grace` seconds for the running ones to finish.
        True when none is left."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self.active and time.monotonic() < deadline and not give_up():
            await asyncio.sleep(POLL_SECONDS)
        return not self.active

    async def end(self, timeout: float = 5.0) -> None:
        """End everything still running; wait up to `timeout` seconds for the callbacks."""
        self.draining = self.ended = True
        pending = [_call(callback) for callback in list(self._on_end.values())]
        tasks = [task for task in pending if task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


def _call(callback: OnEnd) -> asyncio.Future[None] | None:
    try:
        result = callback()
    except Exception:
        logger.exception("ending a request at shutdown failed")
        return None
    return None if result is None else asyncio.ensure_future(result)


class ShutdownGate:
    """ASGI middleware: counts running HTTP requests; while draining, answers new ones with 503
    `shutting_down` (and `Connection: close`) and refuses new WebSocket handshakes."""

    def __init__(self, app: ASGIApp, shutdown: Shutdown) -> None:
        self.app = app
        self.shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self.shutdown.draining:
                error = shutting_down()
                headers = {**error.headers, "Connection": "close"}
                response = JSONResponse(error.envelope(), status_code=error.status, headers=headers)
                await response(scope, receive, send)
                return
            with self.shutdown.track():
                await self.app(scope, receive, send)
        elif scope["type"] == "websocket" and self.shutdown.draining:
            await send({"type": "websocket.close", "code": 1001})  # before accept: HTTP 403
        else:
            await self.app(scope, receive, send)
