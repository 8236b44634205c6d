"""ASGI middleware: the request body limit, enforced on the bytes that actually arrive.

A Content-Length over the limit is refused before reading; a chunked body without one is
counted as it streams in, and reading it fails with PayloadTooLarge (413) the moment it passes
the limit, so a client cannot make the daemon buffer more than `max_body_bytes` either way.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from thoxd.errors import PayloadTooLarge


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                error = PayloadTooLarge(self.limit)
                response = JSONResponse(
                    error.envelope(), status_code=error.status, headers={"Connection": "close"}
                )
                await response(scope, receive, send)
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise PayloadTooLarge(self.limit)
            return message

        await self.app(scope, counting_receive, send)
