"""Responses API input items: checked, stored in one normal shape, and read as chat messages.

An item is a message (`role` user, system, developer or assistant; string content or text
parts; `type: "message"` optional), a `function_call` the model made earlier, or the
`function_call_output` that answers it. Everything is kept as OpenAI returns items from
`GET /v1/responses/{id}/input_items` (an `id` each, text parts, `status`), so a stored
conversation reads back the same whichever way its items were sent.

Images, files and audio are refused by name (no model here sees them); so are the other item
types (reasoning, item references, built-in tool calls).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field, field_validator

from thoxd.api.schemas import Body
from thoxd.errors import InvalidRequest, UnsupportedParameter

Item = dict[str, Any]

_TEXT_PARTS = {"input_text", "output_text", "text"}
_MEDIA_PARTS = {"input_image", "input_file", "input_audio"}
# What each item type needs besides `type`, as the API defines it.
_REQUIRED = {
    "message": ("role", "content"),
    "function_call": ("call_id", "name", "arguments"),
    "function_call_output": ("call_id", "output"),
}


class ContentPart(Body):
    type: str = Field(max_length=64)
    text: str | None = None
    refusal: str | None = None  # an assistant's refusal part


def _as_parts(value: Any) -> Any:
    # A string is one text part: one shape to check and store.
    return [{"type": "input_text", "text": value}] if isinstance(value, str) else value


class InputItem(Body):
    """Any item: which fields it needs depends on its `type`, checked by `normal_items`, so
    that a wrong field is named as `input[i].field` whatever the item's type."""

    type: str | None = Field(None, max_length=64)
    id: str | None = Field(None, min_length=1, max_length=256)
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: list[ContentPart] | None = Field(None, max_length=1024)
    call_id: str | None = Field(None, min_length=1, max_length=256)
    name: str | None = Field(None, min_length=1, max_length=256)
    arguments: str | None = Field(None, max_length=1 << 20)
    output: list[ContentPart] | None = Field(None, max_length=1024)

    _parts = field_validator("content", "output", mode="before")(_as_parts)


def normal_items(
    items: list[InputItem], earlier: Iterable[Item] = (), param: str = "input"
) -> list[Item]:
    """The request's items in their stored shape. A `function_call_output` must answer a call
    made in the conversation (`earlier`, or these items)."""
    calls = {item["call_id"] for item in earlier if item["type"] == "function_call"}
    normal: list[Item] = []
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        kind = item.type or ("message" if item.role is not None else None)
        if kind is None:
            raise InvalidRequest(
                f"Invalid value for '{where}': an item needs a 'type' (or a 'role', for a"
                " message).",
                param=where,
            )
        if kind not in _REQUIRED:
            raise UnsupportedParameter(
                f"Input items of type '{kind}' are not supported: send messages, function_call"
                " and function_call_output items.",
                param=where,
            )
        for field in _REQUIRED[kind]:
            if getattr(item, field) is None:
                raise InvalidRequest(
                    f"Invalid value for '{where}': a '{kind}' item needs '{field}'.",
                    param=f"{where}.{field}",
                )
        if kind == "message":
            normal.append(_message(item, where))
        elif kind == "function_call":
            assert item.call_id is not None and item.name is not None
            assert item.arguments is not None
            calls.add(item.call_id)
            normal.append(function_call(item.call_id, item.name, item.arguments, item.id))
        else:
            assert item.call_id is not None and item.output is not None
            if item.call_id not in calls:
                raise InvalidRequest(
                    f"No function call with call_id '{item.call_id}' comes before this output.",
                    param=f"{where}.call_id",
                )
            normal.append(
                {
                    "id": item.id or new_id("fco"),
                    "type": "function_call_output",
                    "call_id": item.call_id,
                    "output": _text(item.output, f"{where}.output"),
                    "status": "completed",
                }
            )
    return normal


def _message(item: InputItem, where: str) -> Item:
    assert item.role is not None and item.content is not None
    text = _text(item.content, f"{where}.content")
    part = output_text(text) if item.role == "assistant" else {"type": "input_text", "text": text}
    return {
        "id": item.id or new_id("msg"),
        "type": "message",
        "role": item.role,
        "status": "completed",
        "content": [part],
    }


def _text(parts: list[ContentPart], where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if part.type in _MEDIA_PARTS:
            raise UnsupportedParameter(
                f"'{part.type}' content is not supported: the models on this device read text"
                " only.",
                param=f"{where}[{j}]",
            )
        if part.type not in (*_TEXT_PARTS, "refusal"):
            raise UnsupportedParameter(
                f"Content parts of type '{part.type}' are not supported: send 'input_text'.",
                param=f"{where}[{j}].type",
            )
        text = part.text if part.type in _TEXT_PARTS else part.refusal
        if text is None:
            field = "refusal" if part.type == "refusal" else "text"
            raise InvalidRequest(
                f"Invalid value for '{where}[{j}]': a '{part.type}' part needs '{field}'.",
                param=f"{where}[{j}].{field}",
            )
        texts.append(text)
    return "".join(texts)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def function_call(
    call_id: str, name: str, arguments: str, item_id: str | None = None, status: str = "completed"
) -> Item:
    return {
        "id": item_id or new_id("fc"),
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def chat_messages(items: Iterable[Item]) -> list[dict[str, Any]]:
    """The conversation as chat messages: an assistant's function calls join its message (the
    one just before them, or a new one), each output is a `tool` message."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if item["type"] == "message":
            text = "".join(p.get("text") or p.get("refusal") or "" for p in item["content"])
            messages.append({"role": item["role"], "content": text})
        elif item["type"] == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
            )
    return messages
