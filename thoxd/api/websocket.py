"""The WebSocket endpoint `/v1/stream`: token streaming, several requests on one connection.

Client to server, one JSON object per text message:

    {"model", "messages" | "prompt", ...}   a request: a /v1/chat/completions or /v1/completions
                                            body, plus an optional "id" (1-128 characters) and an
                                            optional "type": "request" (the default)
    {"type": "cancel", "id": "..."}         stop that request: its `done` says "cancelled"
    {"type": "ping"}                        answered with {"type": "pong"}
    {"type": "auth", "key": "..."}          with keys on, the first message when the handshake
                                            carried no key (browsers): answered {"type":
                                            "authenticated"}, or an error and close 1008

Server to client:

    {"type": "delta", "id", "model", "choices": [{"index": 0, "delta": {"content": "..."}}]}
        the delta is an OpenAI chunk's: `content`, or `tool_calls` pieces (tools), and the
        choice has `logprobs` when they were asked for
    {"type": "done", "id", "model", "finish_reason", "usage", "timings"}
    {"type": "error", "id" | null, "error": {"message", "type", "param", "code"}}
    {"type": "pong"}

Every request ends with exactly one `done` or one `error`; its events carry the client's `id`, or
one the server made. Bodies are validated and started by the same code as the REST routes
(`thoxd.api.schemas`, `thoxd.api.start`); `stream` is ignored (this always streams) and a completion
takes one prompt per request. A bad message gets an `error` event (id null when the message could
not be read) and the connection stays open; a text message over `max_body_bytes` closes it with
1009. Closing the connection cancels every request it started within one decode step. When the
daemon shuts down, requests still running after its grace period get a `shutting_down` error
and the connection closes with 1001 (going away); new requests meanwhile get that error at once.

A handshake whose `Origin` is neither the device itself (the host the browser reached us by, or
loopback on both sides) nor in `allowed_origins` is refused (403), so a web page elsewhere cannot
drive the box through a visitor's browser. Clients that send no `Origin` (SDKs, scripts) connect.

With keys on (thoxd/guards/access.py), the handshake carries the key (Authorization, X-Api-Key,
or the subprotocol `thox.key.KEY` offered with `thox.v1`, which is selected), or the first
message does. Each request message counts against the key's rate limits: over them, that request
gets a `rate_limit_exceeded` error event (with `retry_after`, in seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from thoxd.access import Caller
from thoxd.api.schemas import ChatRequest, CompletionRequest, parse
from thoxd.api.shapes import Choice, chat_logprobs, new_id, usage
from thoxd.api.start import Started, split_prompts, start_chat, start_completion
from thoxd.api.surrogates import has_lone_surrogate
from thoxd.engine import Delta, Engine, Failed
from thoxd.errors import InvalidApiKey, InvalidRequest, NotFound, PeerUnavailable, ThoxdError
from thoxd.fleet.relay import NoPeerTookIt, relay_events
from thoxd.fleet.routing import Router
from thoxd.guards.access import WS_PROTOCOL, Access, caller_of
from thoxd.guards.origins import normal_origins, origin_allowed
from thoxd.guards.shutdown import Shutdown, shutting_down
from thoxd.settings import Settings

logger = logging.getLogger("thoxd.stream")

MAX_ID_CHARS = 128
MAX_IN_FLIGHT = 256  # per connection; the engine's queue bounds the device as a whole
CLOSE_GOING_AWAY = 1001  # the server shuts down
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
_GONE = (WebSocketDisconnect, WebSocketDisconnected, OSError)  # the peer is gone, or we closed


class StreamRoutes:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        shutdown: Shutdown | None = None,
        access: Access | None = None,
        router: Router | None = None,
    ) -> None:
        self.engine = engine
        self.access = access
        self.router = router  # the fleet's (thoxd/fleet/), when it is on
        self.shutdown = shutdown or Shutdown()
        self.max_message_bytes = settings.max_body_bytes
        self.allowed_origins = normal_origins(settings.allowed_origins)

    def routes(self) -> list[BaseRoute]:
        return [WebSocketRoute("/v1/stream", self.stream)]

    async def stream(self, websocket: WebSocket) -> None:
        origin = websocket.headers.get("origin")
        host = websocket.headers.get("host")
        if origin is not None and not origin_allowed(origin, host, self.allowed_origins):
            logger.info("refused a /v1/stream handshake from origin %r", origin[:200])
            await websocket.close(CLOSE_POLICY_VIOLATION)  # before accept: uvicorn answers 403
            return
        # A browser that offered subprotocols fails the handshake unless one is selected.
        offered = websocket.scope.get("subprotocols", [])
        await websocket.accept(subprotocol=WS_PROTOCOL if WS_PROTOCOL in offered else None)
        connection = _Connection(
            websocket, self.engine, self.max_message_bytes, self.shutdown, self.access, self.router
        )
        forget = self.shutdown.at_end(connection.going_away)
        try:
            await connection.serve()
        finally:
            forget()
            await connection.shutdown()


@dataclass(eq=False)
class _Request:
    id: str
    task: asyncio.Task[None] | None = None
    started: Started | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.started is not None:
            self.started.cancel()


class _Connection:
    """One accepted socket: a reader loop, one task per request, one writer at a time."""

    def __init__(
        self,
        websocket: WebSocket,
        engine: Engine,
        max_message_bytes: int,
        shutdown: Shutdown,
        access: Access | None,
        router: Router | None = None,
    ) -> None:
        self.websocket = websocket
        self.engine = engine
        self.access = access
        self.router = router
        # None until the first message authenticates (the guard found no key in the handshake).
        state = websocket.scope.get("state", {})
        self.caller: Caller | None = state["caller"] if "caller" in state else caller_of(websocket)
        self.stopping = shutdown
        self.max_message_bytes = max_message_bytes
        self.requests: dict[str, _Request] = {}
        self.send_lock = asyncio.Lock()
        self.open = True

    async def serve(self) -> None:
        while self.open:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                error = InvalidRequest("Binary messages are not supported: send JSON as text.")
                await self.send_error(None, error)
            elif len(text) > self.max_message_bytes or len(text.encode()) > self.max_message_bytes:
                await self.close(CLOSE_TOO_BIG, f"message over {self.max_message_bytes} bytes")
            else:
                await self.handle(text)

    async def handle(self, text: str) -> None:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            await self.send_error(None, InvalidRequest("The message is not valid JSON."))
            return
        if not isinstance(data, dict):
            await self.send_error(None, InvalidRequest("A message must be a JSON object."))
            return
        kind = data.pop("type", "request")
        if self.caller is None or kind == "auth":
            await self.authenticate(kind, data)
            return
        given_id = data.pop("id", None)
        if given_id is not None and not (
            isinstance(given_id, str) and 0 < len(given_id) <= MAX_ID_CHARS
        ):
            message = f"'id' must be a string of 1 to {MAX_ID_CHARS} characters."
            await self.send_error(None, InvalidRequest(message, param="id"))
        elif given_id is not None and has_lone_surrogate(given_id):
            # Every event echoes the id: one that cannot be sent as UTF-8 is never used.
            message = "'id' holds a lone surrogate (a \\ud800-\\udfff escape without its pair)."
            await self.send_error(None, InvalidRequest(message, param="id"))
        elif kind == "request":
            await self.start(given_id, data)
        elif kind == "cancel":
            await self.cancel(given_id)
        elif kind == "ping":
            await self.send({"type": "pong"})
        else:
            message = "'type' must be 'request', 'cancel', 'ping' or 'auth'."
            await self.send_error(given_id, InvalidRequest(message, param="type"))

    async def authenticate(self, kind: Any, data: dict[str, Any]) -> None:
        if self.caller is not None:
            await self.send_error(None, InvalidRequest("This connection is authenticated already."))
            return
        key = data.get("key") if kind == "auth" else None
        try:
            if self.access is None or not isinstance(key, str):
                raise InvalidApiKey(
                    'This device needs an API key: send {"type": "auth", "key": KEY} first'
                    " (or the key in the handshake)."
                )
            client = self.websocket.client
            self.caller = self.access.identify(key, client.host if client else "")
        except InvalidApiKey as exc:
            await self.send_error(None, exc)
            await self.close(CLOSE_POLICY_VIOLATION, "invalid API key")
            return
        await self.send({"type": "authenticated"})

    async def start(self, given_id: str | None, body: dict[str, Any]) -> None:
        chat = "messages" in body
        request_id = given_id or new_id("chatcmpl" if chat else "cmpl")
        if self.stopping.draining:
            await self.send_error(request_id, shutting_down())
        elif request_id in self.requests:
            message = f"A request with id '{request_id}' is already in flight on this connection."
            await self.send_error(request_id, InvalidRequest(message, param="id"))
        elif (limited := await self.over_limit()) is not None:
            await self.send_error(request_id, limited)
        elif len(self.requests) >= MAX_IN_FLIGHT:
            message = f"At most {MAX_IN_FLIGHT} requests may be in flight on one connection."
            await self.send_error(request_id, InvalidRequest(message))
        else:
            request = _Request(request_id)
            self.requests[request_id] = request
            request.task = asyncio.create_task(self.run(request, body, chat))
            self.stopping.track_task(request.task)  # the shutdown's grace period waits for it

    async def over_limit(self) -> ThoxdError | None:
        """The caller's rate limits, counting this request (HTTP's are counted by the guard)."""
        if self.access is None or self.caller is None:
            return None
        try:
            await self.access.limiter.admit(self.caller)
        except ThoxdError as exc:
            return exc
        return None

    async def cancel(self, request_id: str | None) -> None:
        request = self.requests.get(request_id) if request_id is not None else None
        if request is None:
            shown = "no id" if request_id is None else f"id '{request_id}'"
            message = f"No request with {shown} is in flight on this connection."
            await self.send_error(request_id, NotFound(message, param="id"))
        else:
            request.cancel()  # its task sends the `done`, with finish_reason "cancelled"

    async def run(self, request: _Request, body: dict[str, Any], chat: bool) -> None:
        try:
            if await self._relayed(request, body, chat):
                return
            started = request.started = await self._start(body, chat)
            if request.cancelled or not self.open:
                started.cancel()
            head = {"id": request.id, "model": started.model_name}
            [output] = started.outputs()
            async for event in started.generations[0].events():
                if isinstance(event, Delta):
                    logprobs = chat_logprobs(list(event.logprobs)) if event.logprobs else None
                    deltas = output.feed(event.text) or ([{}] if logprobs else [])
                    for delta in deltas:
                        choice = {"index": 0, "delta": delta}
                        if logprobs is not None:
                            choice["logprobs"], logprobs = logprobs, None
                        await self.send({"type": "delta", **head, "choices": [choice]})
                elif isinstance(event, Failed):
                    raise event.error
                else:
                    for delta in output.flush():
                        choice = {"index": 0, "delta": delta}
                        await self.send({"type": "delta", **head, "choices": [choice]})
                    done = {
                        "type": "done",
                        **head,
                        "finish_reason": Choice(output.finish(), event).finish_reason,
                        "usage": usage(
                            event.prompt_tokens, event.completion_tokens, event.timings.cache_n
                        ),
                        "timings": event.timings.as_dict(),
                    }
                    await self.send(done)
        except ThoxdError as exc:
            await self.send_error(request.id, exc)
        except Exception:
            logger.exception("request %s on /v1/stream failed", request.id)
            await self.send_error(request.id, ThoxdError("Internal server error."))
        finally:
            if request.started is not None:
                request.started.cancel()  # a no-op once it finished
            if self.requests.get(request.id) is request:
                del self.requests[request.id]

    async def _relayed(self, request: _Request, body: dict[str, Any], chat: bool) -> bool:
        """Served by a peer (thoxd/fleet/relay.py) when the fleet's router says so."""
        name = body.get("model") if isinstance(body.get("model"), str) else None
        peers = self.router.choose(name) if self.router is not None else []
        if not peers or self.router is None:
            return False
        caller = self.caller or caller_of(self.websocket)
        head = {"id": request.id, "model": name or peers[0][1].id}
        await self.router.ready(peers[0][0])
        events = relay_events(self.router.fleet, peers, body, chat, caller.id, caller.may_use)
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    kind = event.pop("type")
                    await self.send({"type": kind, **head, **event})
                    if kind == "done" and self.access is not None:  # counted here too
                        used = event.get("usage") or {}
                        prompt, completion = (
                            used.get("prompt_tokens", 0),
                            used.get("completion_tokens", 0),
                        )
                        self.access.ledger.record(caller.id, peers[0][1].id, prompt, completion, 1)
                    if request.cancelled:  # closing the stream cancels it over there
                        done = {"finish_reason": "cancelled", "usage": usage(0, 0, 0)}
                        await self.send({"type": "done", **head, **done})
                        return True
        except NoPeerTookIt:
            if self.router.here(name):
                return False
            message = (
                f"The model '{name}' is served elsewhere, and what serves it is not answering."
            )
            raise PeerUnavailable(message) from None
        return True

    async def _start(self, body: dict[str, Any], chat: bool) -> Started:
        if not chat and "prompt" not in body:
            message = "A request needs 'messages' (chat) or 'prompt' (text completion)."
            raise InvalidRequest(message, param="messages")
        parsed = parse(ChatRequest, body) if chat else parse(CompletionRequest, body)
        if parsed.n != 1:  # a request's events carry no choice index here
            message = "Send n=1 on /v1/stream: give each choice a request of its own, with its id."
            raise InvalidRequest(message, param="n")
        if isinstance(parsed, ChatRequest):
            return await start_chat(self.engine, parsed, self.caller)
        if len(split_prompts(parsed.prompt)) != 1:
            message = "Send one prompt per request on /v1/stream; give each request its own id."
            raise InvalidRequest(message, param="prompt")
        return await start_completion(self.engine, parsed, self.caller)

    async def send_error(self, request_id: str | None, error: ThoxdError) -> None:
        await self.send({"type": "error", "id": request_id, **error.envelope()})

    async def send(self, event: dict[str, Any]) -> None:
        text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        async with self.send_lock:  # whole frames, one at a time, in order
            if not self.open:
                return
            try:
                await self.websocket.send_text(text)
            except _GONE:
                self.open = False

    async def close(self, code: int, reason: str) -> None:
        async with self.send_lock:
            if self.open:
                self.open = False
                with contextlib.suppress(*_GONE):
                    await self.websocket.close(code, reason)

    async def going_away(self) -> None:
        """The server shuts down: a shutting_down error for each request in flight, then 1001."""
        async with self.send_lock:
            if not self.open:
                return
            self.open = False
            error = shutting_down().envelope()
            with contextlib.suppress(*_GONE):
                for request in list(self.requests.values()):
                    request.cancel()
                    event = {"type": "error", "id": request.id, **error}
                    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
                    await self.websocket.send_text(text)
                await self.websocket.close(CLOSE_GOING_AWAY, "server shutting down")

    async def shutdown(self) -> None:
        """Cancel everything this connection started; the engine frees the slots in one step."""
        self.open = False
        requests = list(self.requests.values())
        for request in requests:
            request.cancel()
        tasks = [r.task for r in requests if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
