"""A WebSocket request (thoxd/api/websocket.py) served by a peer: sent to the peer's own
/v1/chat/completions or /v1/completions with `stream: true`, and its SSE chunks turned back into
this socket's `delta` and `done` events as they arrive. Errors come back as the peer's own
envelopes; a peer that dies mid-stream ends the request with `peer_unavailable`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import httpx

from thoxd.errors import Forbidden, PeerUnavailable, ThoxdError
from thoxd.fleet.peers import Fleet, Peer, PeerModel
from thoxd.fleet.trust import HEADER


class NoPeerTookIt(Exception):
    """Every peer chosen was unreachable or busy before anything was sent: serve it here."""


class Relayed(ThoxdError):
    """An error a peer answered with, in its own envelope."""

    def __init__(self, envelope: dict[str, Any], status: int) -> None:
        error = envelope.get("error")
        if not isinstance(error, dict):
            error = {}
        super().__init__(str(error.get("message", f"The peer answered {status}.")))
        self._envelope = envelope if error else PeerUnavailable(self.message).envelope()

    def envelope(self) -> dict[str, Any]:
        return self._envelope


async def relay_events(
    fleet: Fleet,
    peers: list[tuple[Peer, PeerModel]],
    body: dict[str, Any],
    chat: bool,
    client: str,
    may_use: Callable[[str], bool],
) -> AsyncGenerator[dict[str, Any]]:
    """The request's WebSocket events (without `id` and `model`) from the first peer that takes
    it; NoPeerTookIt before any event when none does."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    payload.pop("id", None)
    payload.pop("type", None)
    for peer, model in peers:
        if not may_use(model.id):
            raise Forbidden(f"This API key may not use the model '{model.id}'.")
        headers = {HEADER: fleet.trust.sign("POST", path, client)} if fleet.trust.on else {}
        request = fleet.forwarder.build_request(
            "POST", peer.url + path, json=payload, headers=headers
        )
        peer.forwarding += 1
        try:
            try:
                response = await fleet.forwarder.send(request, stream=True)
            except httpx.HTTPError:
                fleet.failed(peer)
                continue
            try:
                if response.status_code == 503:
                    continue
                if response.status_code != 200:
                    raw = await response.aread()
                    raise Relayed(_json(raw), response.status_code)
                async for event in _events(fleet, peer, response):
                    yield event
                return
            finally:
                await response.aclose()
        finally:
            peer.forwarding -= 1
    raise NoPeerTookIt


async def _events(
    fleet: Fleet, peer: Peer, response: httpx.Response
) -> AsyncIterator[dict[str, Any]]:
    reason: str | None = None
    timings: dict[str, Any] = {}
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = _json(line[6:].encode())
            if "error" in chunk:
                raise Relayed(chunk, 500)
            for choice in chunk.get("choices") or []:
                delta = {k: v for k, v in (choice.get("delta") or {}).items() if k != "role"}
                if "text" in choice:  # a text completion's chunk
                    delta = {"content": choice["text"]} if choice["text"] else {}
                out: dict[str, Any] = {"index": 0, "delta": delta}
                if choice.get("logprobs"):
                    out["logprobs"] = choice["logprobs"]
                if any(delta.values()) or "logprobs" in out:
                    yield {"type": "delta", "choices": [out]}
                if choice.get("finish_reason"):
                    reason = choice["finish_reason"]
                    timings = chunk.get("timings") or timings
            if chunk.get("usage") and not chunk.get("choices"):
                yield {
                    "type": "done",
                    "finish_reason": reason,
                    "usage": chunk["usage"],
                    "timings": timings,
                }
    except httpx.HTTPError as exc:
        fleet.failed(peer)
        raise PeerUnavailable(f"The box serving this request ({peer.name}) stopped.") from exc


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
