"""The OpenAI Responses API: `POST /v1/responses` (plain and SSE), and the stored responses it
continues from (`GET` and `DELETE /v1/responses/{id}`, `GET .../input_items`).

A request becomes the chat request chat completions take (thoxd.api.responses_request) and starts
through `start_chat`, so both APIs follow the same rules. The conversation so far comes from the
store (`previous_response_id`); a response is stored unless `store: false`. As with chat, a
client that goes away cancels the generation within one decode step.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from thoxd.api.conversations import Item, ResponseStore, StoredResponse
from thoxd.api.responses_items import chat_messages, normal_items
from thoxd.api.responses_request import ResponsesRequest, renamed_params
from thoxd.api.responses_shapes import Draft, Event, OutputItems, status_of
from thoxd.api.schemas import parse
from thoxd.api.serving import SSE_HEADERS, merged_events, sse_event, unless_gone
from thoxd.api.start import Started, start_chat
from thoxd.engine import Delta, Engine, Failed, Finished
from thoxd.errors import (
    InvalidRequest,
    PreviousResponseNotFound,
    ResponseNotFound,
    UnsupportedParameter,
)
from thoxd.guards.access import caller_of
from thoxd.guards.shutdown import Shutdown, shutting_down


@dataclass
class _Run:
    """One response being generated: what it was asked, what it answers, how it is going."""

    body: ResponsesRequest
    started: Started
    inputs: list[Item]  # the conversation it answers: earlier items, then its own input
    draft: Draft
    items: OutputItems


class ResponsesRoutes:
    def __init__(self, engine: Engine, store: ResponseStore, shutdown: Shutdown | None = None):
        self.engine = engine
        self.store = store
        self.shutdown = shutdown or Shutdown()

    def routes(self) -> list[Route]:
        return [
            Route("/v1/responses", self.create, methods=["POST"]),
            Route("/v1/responses/{response_id}", self.retrieve, methods=["GET"]),
            Route("/v1/responses/{response_id}", self.delete, methods=["DELETE"]),
            Route("/v1/responses/{response_id}/input_items", self.input_items, methods=["GET"]),
        ]

    # -- create ----------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        body = parse(ResponsesRequest, await request.body())
        body.check_supported()
        earlier: tuple[Item, ...] = ()
        if body.previous_response_id is not None:
            previous = self.store.get(body.previous_response_id)
            if previous is None:
                raise PreviousResponseNotFound(body.previous_response_id)
            earlier = previous.conversation
        inputs = [*earlier, *normal_items(body.input or [], earlier)]
        chat = body.chat_request(chat_messages(inputs))
        with renamed_params():
            started = await start_chat(self.engine, chat, caller_of(request))
        settings = body.settings(started.model.spec.defaults)
        run = _Run(body, started, inputs, Draft(body.model, settings), OutputItems())
        request.state.response_id = run.draft.id  # the x-request-id header
        if body.stream:
            return StreamingResponse(
                self._sse(run), media_type="text/event-stream", headers=SSE_HEADERS
            )
        answer = await unless_gone(request, self._collect(run), started.cancel, self.shutdown)
        return Response(status_code=499) if answer is None else JSONResponse(answer)

    async def _collect(self, run: _Run) -> dict[str, Any]:
        output = run.started.outputs()[0]
        finished: Finished | None = None
        async for _, event in merged_events(run.started):
            if isinstance(event, Delta):
                run.items.feed(output.feed(event.text))
            elif isinstance(event, Failed):
                run.started.cancel()
                raise event.error
            elif event.finish_reason == "cancelled" and self.shutdown.ended:
                raise shutting_down()
            else:
                finished = event
        assert finished is not None
        run.items.feed(output.flush())
        run.items.finish(complete=finished.finish_reason == "stop")
        return self._done(run, finished)

    def _done(self, run: _Run, finished: Finished) -> dict[str, Any]:
        status = status_of(finished)
        response = run.draft.response(status, run.items.items, finished)
        if run.body.stored and status != "cancelled":
            self.store.put(response, run.inputs)
        return response

    async def _sse(self, run: _Run) -> AsyncIterator[str]:
        numbers = itertools.count()
        obfuscate = (
            run.body.stream_options is not None and run.body.stream_options.include_obfuscation
        )

        def send(event: Event) -> str:
            event["sequence_number"] = next(numbers)
            if obfuscate and "delta" in event:
                event["obfuscation"] = _padding(len(event["delta"]))
            return sse_event(event["type"], event)

        started, output = run.started, run.started.outputs()[0]
        # Past the shutdown's grace period: cancelled, and ended with a shutting_down event.
        forget = self.shutdown.at_end(started.cancel)
        try:
            for kind in ("response.created", "response.in_progress"):
                yield send({"type": kind, "response": run.draft.response("in_progress")})
            async for _, event in merged_events(started):
                if isinstance(event, Delta):
                    for change in run.items.feed(output.feed(event.text)):
                        yield send(change)
                elif isinstance(event, Failed):
                    error = {"code": "server_error", "message": event.error.message}
                    failed = run.draft.response("failed", run.items.items, error=error)
                    yield send({"type": "response.failed", "response": failed})
                    return
                elif event.finish_reason == "cancelled" and self.shutdown.ended:
                    gone = shutting_down()
                    yield send({"type": "error", "code": gone.code, "message": gone.message})
                    return
                else:
                    changes = run.items.feed(output.flush())
                    changes += run.items.finish(complete=event.finish_reason == "stop")
                    for change in changes:
                        yield send(change)
                    response = self._done(run, event)
                    done = "completed" if response["status"] == "completed" else "incomplete"
                    yield send({"type": f"response.{done}", "response": response})
        finally:
            # Runs when the client disconnects too: the slot is freed within one step.
            started.cancel()
            forget()

    # -- stored responses ------------------------------------------------------------------

    def _stored(self, request: Request) -> StoredResponse:
        response_id = request.path_params["response_id"]
        if any(key.startswith("include") for key in request.query_params):
            raise UnsupportedParameter(
                "'include' is not supported: no reasoning, search results or log probabilities"
                " are kept.",
                param="include",
            )
        stored = self.store.get(response_id)
        if stored is None:
            raise ResponseNotFound(response_id)
        return stored

    async def retrieve(self, request: Request) -> Response:
        if request.query_params.get("stream", "false").lower() not in ("false", "0"):
            raise UnsupportedParameter(
                "A stored response cannot be streamed again: it is sent whole.", param="stream"
            )
        return JSONResponse(self._stored(request).response)

    async def delete(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        if not self.store.delete(response_id):
            raise ResponseNotFound(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    async def input_items(self, request: Request) -> Response:
        """The conversation a stored response answered (its input, after the earlier items),
        newest first unless `order=asc`, `limit` (1-100, default 20) at a time after `after`."""
        items = list(self._stored(request).inputs)
        query = request.query_params
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequest("Invalid value for 'order': 'asc' or 'desc'.", param="order")
        limit = query.get("limit", "20")
        if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= 100):
            raise InvalidRequest("Invalid value for 'limit': 1 to 100.", param="limit")
        if order == "desc":
            items.reverse()
        if (after := query.get("after")) is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise InvalidRequest(f"No item '{after[:64]}' in this list.", param="after")
            items = items[ids.index(after) + 1 :]
        page = items[: int(limit)]
        return JSONResponse(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(items) > len(page),
            }
        )


def _padding(n: int) -> str:
    """Stream obfuscation: random text that brings a delta event's size to a multiple of 32
    characters, so the sizes of encrypted events do not tell the tokens apart."""
    return secrets.token_urlsafe(32)[: 32 - n % 32]
