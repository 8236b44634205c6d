"""Responses API objects, built as plain dicts: the response, its output items as the model writes
them, and the events a stream tells them with.

A response's output is read from the same chat output parsers as chat completions
(thoxd.api.toolcalls): their deltas, `{"content": ...}` or `{"tool_calls": [...]}` pieces, become
output items here. Text is a `message` item with one `output_text` part, each tool call a
`function_call` item; an item is done when the next one starts or the answer ends. Streamed or
not, a response's output is built the same way, so both end with the same items.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from thoxd.api.responses_items import Item, function_call, new_id, output_text
from thoxd.api.toolcalls import Delta
from thoxd.engine import Finished

Event = dict[str, Any]


class Draft:
    """What every state of one response shares: its id, when it began, the model as asked for,
    and the request's settings it echoes."""

    def __init__(self, model: str, settings: dict[str, Any]) -> None:
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.model = model
        self.settings = settings

    def response(
        self,
        status: str,
        output: Sequence[Item] = (),
        finished: Finished | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The response object in `status`: in_progress (no output yet), completed, incomplete
        (cut short by its token limit), failed (with `error`)."""
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        response = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": list(output),
            "usage": usage(finished) if finished is not None else None,
            **self.settings,
        }
        if finished is not None:
            response["timings"] = finished.timings.as_dict()  # as every generation answer has
        return response


def usage(finished: Finished) -> dict[str, Any]:
    return {
        "input_tokens": finished.prompt_tokens,
        # The prompt's start found in the prefix cache.
        "input_tokens_details": {"cached_tokens": finished.timings.cache_n},
        "output_tokens": finished.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},  # no model here reasons apart
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def status_of(finished: Finished) -> str:
    reason = finished.finish_reason
    return {"stop": "completed", "length": "incomplete"}.get(reason, "cancelled")


class OutputItems:
    """The output items of one response, written from a chat output's deltas. Each change comes
    back as the stream events that tell it, in the Responses API's order: an item is added,
    (a message's text part is added,) its text or arguments come in deltas, then it is done."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self._open: Item | None = None  # the item being written: always the last one
        self._calls: dict[int, int] = {}  # a call's index in the chat deltas -> its output index
        self._early: dict[int, str] = {}  # arguments that came before their call's name
        # Blank text before any item or between calls: content only if more text follows.
        self._blank = ""

    def feed(self, deltas: list[Delta]) -> list[Event]:
        events: list[Event] = []
        for delta in deltas:
            if delta.get("content"):
                self._text(delta["content"], events)
            for piece in delta.get("tool_calls") or ():
                self._call(piece, events)
        return events

    def finish(self, complete: bool) -> list[Event]:
        """Close the item being written; `complete`: the answer ended by itself, not cut short.
        An answer with nothing in it is one empty message, so it always has an output."""
        events: list[Event] = []
        if not self.items:
            self._message(events)
        self._close(events, "completed" if complete else "incomplete")
        return events

    def _text(self, text: str, events: list[Event]) -> None:
        message = self._open if self._open is not None and self._open["type"] == "message" else None
        if message is None:
            if not text.strip():
                self._blank += text
                return
            self._close(events, "completed")
            message = self._message(events)
        self._append(message, text, events)

    def _message(self, events: list[Event]) -> Item:
        item: Item = {
            "id": new_id("msg"),
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        index = self._add(item, events)
        part = output_text("")
        item["content"].append(part)
        events.append(
            {
                "type": "response.content_part.added",
                "item_id": item["id"],
                "output_index": index,
                "content_index": 0,
                "part": output_text(""),
            }
        )
        blank, self._blank = self._blank, ""
        if blank:
            self._append(item, blank, events)
        return item

    def _append(self, message: Item, text: str, events: list[Event]) -> None:
        message["content"][0]["text"] += text
        events.append(
            {
                "type": "response.output_text.delta",
                "item_id": message["id"],
                "output_index": len(self.items) - 1,
                "content_index": 0,
                "delta": text,
                "logprobs": [],
            }
        )

    def _call(self, piece: dict[str, Any], events: list[Event]) -> None:
        index = piece["index"]
        function = piece.get("function") or {}
        if "id" in piece:  # a new call, named
            self._blank = ""  # the space between calls is no content
            self._close(events, "completed")
            item = function_call(piece["id"], function.get("name", ""), "", status="in_progress")
            self._calls[index] = self._add(item, events)
            if early := self._early.pop(index, ""):
                self._arguments(self._calls[index], early, events)
        elif arguments := function.get("arguments"):
            if index in self._calls:
                self._arguments(self._calls[index], arguments, events)
            else:
                self._early[index] = self._early.get(index, "") + arguments

    def _arguments(self, index: int, text: str, events: list[Event]) -> None:
        item = self.items[index]
        item["arguments"] += text
        events.append(
            {
                "type": "response.function_call_arguments.delta",
                "item_id": item["id"],
                "output_index": index,
                "delta": text,
            }
        )

    def _add(self, item: Item, events: list[Event]) -> int:
        index = len(self.items)
        self.items.append(item)
        self._open = item
        events.append(
            {"type": "response.output_item.added", "output_index": index, "item": _copy(item)}
        )
        return index

    def _close(self, events: list[Event], status: str) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        index = len(self.items) - 1
        item["status"] = status
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "message":
            part = item["content"][0]
            events.append(
                {
                    "type": "response.output_text.done",
                    **where,
                    "content_index": 0,
                    "text": part["text"],
                    "logprobs": [],
                }
            )
            events.append(
                {
                    "type": "response.content_part.done",
                    **where,
                    "content_index": 0,
                    "part": dict(part),
                }
            )
        else:
            events.append(
                {
                    "type": "response.function_call_arguments.done",
                    **where,
                    "name": item["name"],
                    "arguments": item["arguments"],
                }
            )
        events.append(
            {"type": "response.output_item.done", "output_index": index, "item": _copy(item)}
        )


def _copy(item: Item) -> Item:
    # Events are encoded later than they are made: each carries the item as it was then.
    copied = dict(item)
    if "content" in copied:
        copied["content"] = [dict(part) for part in copied["content"]]
    return copied
