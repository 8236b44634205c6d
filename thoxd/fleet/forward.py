"""Forwarding an HTTP request to a peer: an ASGI middleware in front of the generating routes.

It reads the body (already bounded by the body-size guard), takes its `model`, asks the Router
(thoxd/fleet/routing.py) where it runs, and either hands it on here unchanged or sends it to a
peer, signed (thoxd/fleet/trust.py) for the client it came from. The answer comes back as the
peer sends it: status, body type, and SSE chunks one by one as they arrive, so a client sees one
box; `X-Thox-Served-By` names the box that served it. A client that leaves closes the peer
connection, and the peer cancels the work as for any client that leaves.

A peer that cannot be reached, or answers 503 (shutting down, its queue full), before anything
was sent is passed over for the next one, then this box. A peer that dies mid-stream ends the
stream with an SSE `error` event (`peer_unavailable`, 502), and leaves use until it answers a
poll again. A model that only unreachable peers serve gets 502 `peer_unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

import httpx
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from thoxd.api.serving import sse_data, until_disconnect
from thoxd.errors import Forbidden, PeerUnavailable
from thoxd.fleet.peers import Fleet, Peer
from thoxd.fleet.routing import Router
from thoxd.fleet.trust import HEADER
from thoxd.guards.access import caller_of
from thoxd.guards.lan import refuse

logger = logging.getLogger("thoxd.fleet")

ROUTED_PATHS = frozenset(
    f"{prefix}/{name}"
    for prefix in ("/v1", "/api", "/api/v1")
    for name in ("chat/completions", "completions", "embeddings")
)
# What of a peer's answer reaches the client (hop-by-hop headers and its request id stay there).
PASSED_HEADERS = frozenset(
    {"content-type", "content-length", "cache-control", "x-accel-buffering", "retry-after"}
)
SERVED_BY = "x-thox-served-by"


# Tokens used by a forwarded request: (client, model, prompt tokens, completion tokens).
UsageHook = Callable[[str, str, int, int], None]
KEEP_JSON = 1 << 20  # bytes of a plain answer kept to read its usage
KEEP_SSE = 16 << 10  # bytes of a stream's end kept to read its last chunk's usage


class ForwardingMiddleware:
    def __init__(self, app: ASGIApp, router: Router, on_usage: UsageHook | None = None) -> None:
        self.app = app
        self.router = router
        # The box the client talks to counts what it used elsewhere too (its tokens_per_day).
        self.on_usage = on_usage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in ROUTED_PATHS
            or not self.router.forwards()  # nowhere else to go: no body to read
            or scope.get("state", {}).get("fleet_hop")
        ):
            await self.app(scope, receive, send)
            return
        body, more = await _read_body(receive)
        if more:  # the client left while sending: nothing to answer
            return
        name = _model_name(body)
        peers = self.router.choose(name)
        caller = caller_of(HTTPConnection(scope))
        for peer, model in peers:
            if not caller.may_use(model.id):
                refused = Forbidden(f"This API key may not use the model '{model.id}'.")
                await refuse(scope, receive, send, refused)
                return
            await self.router.ready(peer)
            answer = await forward(self.router.fleet, peer, scope, body, receive, send, caller.id)
            if answer is not None:
                used = tokens_used(answer)
                if used is not None and self.on_usage is not None:
                    self.on_usage(caller.id, model.id, *used)
                return
        if peers and not self.router.here(name):
            error = PeerUnavailable(
                f"The model '{name}' is served elsewhere, and what serves it is not answering."
            )
            await refuse(scope, receive, send, error)
            return
        await self.app(scope, _replay(body, receive), send)


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole body, and whether the client left before sending all of it."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _model_name(body: bytes) -> str | None:
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        data = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            return str(data["model"])
    return None


async def forward(
    fleet: Fleet,
    peer: Peer,
    scope: Scope,
    body: bytes,
    receive: Receive,
    send: Send,
    client: str,
) -> bytes | None:
    """Send the request to `peer` and its answer to the client; what was kept of the answer (to
    read its usage from). None (nothing was sent to the client) when the peer could not take
    it: the caller tries the next one."""
    path = scope["path"]
    query = scope.get("query_string", b"").decode("latin-1")
    accept = Headers(scope=scope).get("accept", "*/*")
    headers = {"content-type": "application/json", "accept": accept}
    if fleet.trust.on:  # a split model's own process is no peer: it needs no signature
        headers[HEADER] = fleet.trust.sign("POST", path, client)
    request = fleet.forwarder.build_request(
        "POST", peer.url + path + (f"?{query}" if query else ""), content=body, headers=headers
    )
    peer.forwarding += 1
    try:
        try:
            response = await fleet.forwarder.send(request, stream=True)
        except httpx.HTTPError as exc:
            logger.warning("fleet: %s could not take a request: %s", peer.name, type(exc).__name__)
            fleet.failed(peer)
            return None
        try:
            if response.status_code == 503:
                return None  # shutting down, or its queue is full: the next one may take it
            return await _relay(fleet, peer, response, receive, send)
        finally:
            await response.aclose()
    finally:
        peer.forwarding -= 1


async def _relay(
    fleet: Fleet, peer: Peer, response: httpx.Response, receive: Receive, send: Send
) -> bytes:
    headers = [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in response.headers.items()
        if k.lower() in PASSED_HEADERS
    ]
    headers.append((SERVED_BY.encode(), peer.name.encode("latin-1", "replace")))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    sse = response.headers.get("content-type", "").startswith("text/event-stream")
    kept = bytearray()

    async def pump() -> None:
        tail = b""
        try:
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                kept.extend(chunk)
                if sse and len(kept) > 2 * KEEP_SSE:
                    del kept[:-KEEP_SSE]
        except httpx.HTTPError as exc:
            logger.warning("fleet: %s failed mid-answer: %s", peer.name, type(exc).__name__)
            fleet.failed(peer)
            if sse:
                error = PeerUnavailable(f"The box serving this request ({peer.name}) stopped.")
                tail = sse_data(error.envelope()).encode()
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    # Whichever ends first: the answer, or the client (then the peer connection closes).
    work = asyncio.ensure_future(pump())
    gone = asyncio.ensure_future(until_disconnect(receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, gone):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
    return bytes(kept) if sse or len(kept) <= KEEP_JSON else b""


def tokens_used(answer: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a kept answer: a plain answer's `usage`, or a stream's
    last chunk that says (`usage` when asked for, else thoxd's `timings`)."""
    text = answer.decode("utf-8", errors="replace")
    if text.lstrip().startswith("{"):
        candidates = [text]
    else:
        candidates = [line[6:] for line in text.splitlines() if line.startswith("data: {")]
    for raw in reversed(candidates):
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            data = json.loads(raw)
            usage, timings = data.get("usage"), data.get("timings")
            if isinstance(usage, dict):
                prompt = int(usage.get("prompt_tokens", 0))
                return prompt, int(usage.get("completion_tokens", 0))
            if isinstance(timings, dict):
                prompt = int(timings.get("prompt_n", 0)) + int(timings.get("cache_n", 0))
                return prompt, int(timings.get("predicted_n", 0))
    return None
