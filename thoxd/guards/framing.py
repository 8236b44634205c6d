"""Request framing: a body's length must be said one way only.

h11 trusts Transfer-Encoding over Content-Length (RFC 7230 section 3.3.3), but a proxy in front
may trust Content-Length: then the two disagree on where the body ends, and the rest is read as a
second request that nobody checked (request smuggling). RFC 7230 lets a server refuse such a
message; closing the connection leaves no bytes behind to misread.

    FramingGuard   both `Transfer-Encoding` and `Content-Length`: 400 ambiguous_framing, and
                   the connection closes before anything reads the body
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from thoxd.errors import AmbiguousFraming

logger = logging.getLogger("thoxd.security")


class FramingGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = {name for name, _ in scope["headers"]}
            if b"transfer-encoding" in names and b"content-length" in names:
                logger.info("refused a request with both Transfer-Encoding and Content-Length")
                error = AmbiguousFraming(
                    "A request may not carry both Transfer-Encoding and Content-Length."
                )
                response = JSONResponse(
                    error.envelope(), status_code=error.status, headers=error.headers
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
