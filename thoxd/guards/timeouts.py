"""Deadlines for slow clients: uvicorn has neither, so without them a client that opens a socket
and sends a byte now and then holds a connection (and its memory) forever.

    HeaderTimeoutProtocol     uvicorn's h11 protocol with a deadline for the request headers: a
                              connection that sends nothing, or dribbles its headers, is closed
                              after `header_timeout` seconds (with a 408 if part of a request
                              came). thoxd.server sets the deadline in a subclass.
    BodyTimeoutMiddleware     408 when a request body has not arrived `body_timeout_seconds` after
                              its headers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from http import HTTPStatus
from typing import ClassVar

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from thoxd.errors import RequestTimeout, ThoxdError

logger = logging.getLogger("thoxd.security")


class BodyTimeoutMiddleware:
    """The whole request body must arrive within `seconds` of the headers; else 408 and close.

    Only while the body is still coming: waiting for `http.disconnect` afterwards (a long
    generation) has no deadline.
    """

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.seconds
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                logger.info("request body not received within %.0f s; 408", self.seconds)
                raise RequestTimeout(
                    f"The request body did not arrive within {self.seconds:g} seconds."
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)


# -- the header deadline, in uvicorn's h11 protocol ------------------------------------------


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's headers.

    The clock starts when the connection opens, and for later requests on a kept-alive
    connection at their first byte (idle time between requests is uvicorn's keep-alive
    timeout). It stops when the headers are complete; the body has `BodyTimeoutMiddleware`.
    The same deadline covers the rest of a body that nobody reads any more (the response went
    out early, as a 404 or 413 does): uvicorn would otherwise take it at any pace.
    """

    header_timeout: ClassVar[float] = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._check()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY:  # answered before the body came
            self._check()

    def _waiting(self) -> bool:
        """Whether only the client can move: its headers, or a body already answered."""
        their, ours = self.conn.their_state, self.conn.our_state
        return their is h11.IDLE or (their is h11.SEND_BODY and ours in (h11.DONE, h11.MUST_CLOSE))

    def _check(self) -> None:
        if self._waiting() and not self.transport.is_closing():
            self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._waiting():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.debug("closed %s: no request headers within %g s", client, self.header_timeout)
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            error = RequestTimeout(
                f"The request headers did not arrive within {self.header_timeout:g} seconds."
            )
            self.transport.write(raw_response(error))  # say why
        self.transport.close()


def raw_response(error: ThoxdError) -> bytes:
    """An error as a whole HTTP/1.1 response that closes the connection, for the protocol to
    write itself where no request reached the app (h11 is not asked: it may be mid-request)."""
    body = json.dumps(error.envelope()).encode()
    reason = HTTPStatus(error.status).phrase
    head = [f"HTTP/1.1 {error.status} {reason}", "content-type: application/json"]
    head += [f"{k.lower()}: {v}" for k, v in error.headers.items() if k.lower() != "connection"]
    head += [f"content-length: {len(body)}", "connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body
