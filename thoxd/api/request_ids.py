"""Request ids: `x-request-id` on every HTTP answer, and a log line per API request.

The id is the one the response body carries (`chatcmpl-…`, `cmpl-…`, `resp_…`: a handler puts it
in `request.state.response_id`), else a fresh `req_…`. A client may send its own `X-Request-Id`
(up to 128 characters of letters, digits and `._:/-`); it is logged beside ours, so one grep of
the journal finds the daemon's side of a client's request. Ours stays the one in the header: it
is what the body names.
"""

from __future__ import annotations

import logging
import re
import secrets
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("thoxd.requests")

_CLIENT_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
# Requests worth a line in the journal: the API's, not the health and metrics polls.
_LOGGED = ("/v1/", "/mcp", "/models/")


def response_id(scope: Scope) -> str | None:
    """The id a handler gave this request's answer, if any."""
    state = scope.get("state")
    return state.get("response_id") if isinstance(state, dict) else None


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        given = Headers(scope=scope).get("x-request-id", "")
        client_id = given if _CLIENT_ID.fullmatch(given) else None
        started = time.monotonic()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                rid = state.get("response_id") or f"req_{secrets.token_hex(12)}"
                state["response_id"] = rid
                MutableHeaders(scope=message)["x-request-id"] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["path"].startswith(_LOGGED):
                logger.info(
                    "%s %s %s %s%s %.0f ms",
                    scope["method"],
                    scope["path"],
                    status or "-",
                    state.get("response_id", "-"),
                    f" (client id {client_id})" if client_id else "",
                    (time.monotonic() - started) * 1000.0,
                )
