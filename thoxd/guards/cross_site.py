"""Cross-site requests: a page on any web site can make its visitor's browser send a "simple"
request to the box (a POST with `Content-Type: text/plain`, no CORS preflight), and the browser
sends it even though the page may not read the answer. The Host allowlist does not stop this: the
browser names the box by its real name. So every state-changing request passes two checks:

    CrossSiteGuard   POST, PUT, PATCH and DELETE with an `Origin` that may not use the device
                     (guards/origins.py: the device itself, loopback to loopback, or
                     `allowed_origins`): 403 origin_not_allowed. Then a body that is not declared
                     JSON (`application/json`, `application/*+json`, parameters allowed): 415.
                     No simple request can declare JSON, so a page elsewhere never reaches a
                     handler without a preflight, which only `allowed_origins` pass.

A request without a body (`POST /models/unload` alone) passes the second check, and clients that
send no `Origin` (SDKs, scripts, curl) are not browsers: only the JSON rule applies to them, and
its message tells a curl user which header was missing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from thoxd.errors import OriginNotAllowed, ThoxdError, UnsupportedMediaType
from thoxd.guards.origins import normal_origins, origin_allowed

logger = logging.getLogger("thoxd.security")

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# RFC 6838 subtype characters; `application/*+json` covers merge-patch+json, vnd.*+json, ...
_JSON = re.compile(r"application/(?:[a-z0-9!#$&^_.+-]{1,100}\+)?json")


def is_json(content_type: str) -> bool:
    """Whether a Content-Type value declares JSON (`; charset=...` and other parameters allowed)."""
    media_type = content_type.split(";", 1)[0].strip(" \t").lower()
    return _JSON.fullmatch(media_type) is not None


def has_body(headers: Headers) -> bool:
    if "transfer-encoding" in headers:
        return True
    length = headers.get("content-length")
    return length is not None and length.strip("0") != ""


class CrossSiteGuard:
    """403 for a state-changing request from a foreign browser origin; 415 for a body that is
    not JSON. Everything else (GET, HEAD, OPTIONS preflights, WebSockets) passes untouched."""

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str]) -> None:
        self.app = app
        self.allowed = normal_origins(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in STATE_CHANGING:
            error = self.refusal(Headers(scope=scope))
            if error is not None:
                # The body stays unread: close rather than drain it for a next request.
                headers = {**error.headers, "Connection": "close"}
                response = JSONResponse(error.envelope(), status_code=error.status, headers=headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, headers: Headers) -> ThoxdError | None:
        host = headers.get("host")
        for origin in headers.getlist("origin"):
            if not origin_allowed(origin, host, self.allowed):
                shown = origin[:64]
                logger.info("refused a cross-site request from origin %r", shown)
                return OriginNotAllowed(
                    f"Web pages from '{shown}' may not use this device. To allow them, add "
                    "the origin to allowed_origins."
                )
        if not has_body(headers):
            return None
        types = headers.getlist("content-type")
        if len(types) == 1 and is_json(types[0]):
            return None
        shown = ", ".join(types)[:64] or "none"
        return UnsupportedMediaType(
            f"The request body must be JSON, sent with the header 'Content-Type: "
            f"application/json' (this request's Content-Type: {shown}). With curl: "
            "-H 'Content-Type: application/json'.",
        )
