"""Errors in the seed documents' own shapes, on their routes.

Every error starts as a ThoxdError and is answered in OpenAI's envelope, by the guards (a key,
a rate limit, a body too large) or the app's handler. On a seed route (thoxd/api/locallab.py,
rox.py) this outermost middleware reads that envelope back and answers it in the route's own
shape, with the renderer its module declares: one tree of errors, one shape per dialect.
Success bodies and streams pass through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The envelope's error object -> (status, body) in a dialect's shape.
Renderer = Callable[[dict[str, Any]], tuple[int, Any]]


class ErrorDialects:
    def __init__(self, app: ASGIApp, renderers: Mapping[str, Renderer]) -> None:
        self.app = app
        self.renderers = renderers  # by path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        render = self.renderers.get(scope["path"]) if scope["type"] == "http" else None
        if render is None:
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def rewrite(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # held until the body is whole
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await _send_rendered(send, start, b"".join(chunks), render)

        await self.app(scope, receive, rewrite)


async def _send_rendered(send: Send, start: Message, body: bytes, render: Renderer) -> None:
    try:
        error = json.loads(body)["error"]
        status, shaped = render(error)
        out = json.dumps(shaped).encode()
    except (ValueError, KeyError, TypeError):  # not our envelope: as it was
        status, out = start["status"], body
    headers = MutableHeaders(raw=list(start.get("headers", [])))
    headers["content-length"] = str(len(out))
    headers["content-type"] = "application/json"
    await send({"type": "http.response.start", "status": status, "headers": headers.raw})
    await send({"type": "http.response.body", "body": out})
