"""A chat choice's output as the client sees it: plain text, or tool calls read out of it.

Each parser takes the generated text as it comes (`feed`) and gives back OpenAI delta objects
to stream, then the final message (`finish`). Tool calls stream in OpenAI's shape: the first delta
of a call carries its `index`, `id`, `type` and `function.name`; then `function.arguments`
arrives in pieces, exactly the JSON text the model wrote, which the SDKs' stream helpers join.

    PlainOutput      the text is the content
    GenericOutput    thoxd's generic format, a JSON document the grammar enforces:
                     {"tool_calls": [{"name", "arguments"}...]} or {"response": "..."}
    TaggedOutput     a model's own format: content, then calls in markers
                     (Hermes/Qwen "<tool_call>{...}</tool_call>", Mistral "[TOOL_CALLS][...]",
                     Llama 3.x '{"name": ..., "parameters": ...}')
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from thoxd.api.jsonstream import Closed, JsonStream, Path, Scalar, StringDecoder

Delta = dict[str, Any]


@dataclass
class Message:
    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


class PlainOutput:
    def __init__(self) -> None:
        self._parts: list[str] = []

    def feed(self, text: str) -> list[Delta]:
        self._parts.append(text)
        return [{"content": text}] if text else []

    def flush(self) -> list[Delta]:
        return []

    def finish(self) -> Message:
        return Message("".join(self._parts))


@dataclass
class _Call:
    id: str
    name_raw: str = ""
    name: str | None = None
    arguments: str = ""


class _Calls:
    """Tool calls being read from JSON events: a call's name, then its raw arguments."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self._slots: dict[Path, int] = {}

    def _index(self, call_path: Path) -> int:
        if call_path not in self._slots:
            self._slots[call_path] = len(self.calls)
            self.calls.append(_Call(call_id()))
        return self._slots[call_path]

    def name(self, call_path: Path, event: Scalar | Closed) -> list[Delta]:
        i = self._index(call_path)
        call = self.calls[i]
        if isinstance(event, Scalar):
            call.name_raw += event.text
            return []
        call.name = str(json.loads(call.name_raw))
        function = {"name": call.name, "arguments": ""}
        return [
            {"tool_calls": [{"index": i, "id": call.id, "type": "function", "function": function}]}
        ]

    def arguments(self, call_path: Path, text: str) -> list[Delta]:
        i = self._index(call_path)
        self.calls[i].arguments += text
        return [{"tool_calls": [{"index": i, "function": {"arguments": text}}]}]

    def finished(self) -> list[dict[str, Any]]:
        """The calls that came out whole (a name, and arguments that parse)."""
        done = []
        for call in self.calls:
            try:
                json.loads(call.arguments)
            except ValueError:
                continue
            if call.name is not None:
                function = {"name": call.name, "arguments": call.arguments}
                done.append({"id": call.id, "type": "function", "function": function})
        return done


class GenericOutput:
    """{"tool_calls": [{"name": ..., "arguments": {...}}, ...]} or {"response": "..."}."""

    def __init__(self) -> None:
        self._stream = JsonStream(capture=_is_generic_arguments)
        self._calls = _Calls()
        self._response = StringDecoder()
        self._content: list[str] | None = None
        self._raw: list[str] = []

    def feed(self, text: str) -> list[Delta]:
        self._raw.append(text)
        deltas: list[Delta] = []
        for event in self._stream.feed(text):
            path = event.path
            if path == ("response",) and isinstance(event, Scalar):
                self._content = self._content or []
                if piece := self._response.feed(event.text):
                    self._content.append(piece)
                    deltas.append({"content": piece})
            elif len(path) == 3 and path[0] == "tool_calls" and path[2] == "name":
                deltas += self._calls.name(path[:2], event)
            elif _is_generic_arguments(path) and isinstance(event, Scalar):
                deltas += self._calls.arguments(path[:2], event.text)
        return merge(deltas)

    def flush(self) -> list[Delta]:
        return []

    def finish(self) -> Message:
        if not self._stream.done:  # cut short (max_tokens): what there is, as text
            return Message("".join(self._raw) or None)
        content = "".join(self._content) if self._content is not None else None
        return Message(content, self._calls.finished())


def _is_generic_arguments(path: Path) -> bool:
    return len(path) == 3 and path[0] == "tool_calls" and path[2] == "arguments"


@dataclass(frozen=True)
class Tags:
    """Where a model's own format puts its calls: after `start` (text), until `end`; each call
    one JSON object, or (`array`) one JSON array of them; the arguments under `arguments`."""

    start: str
    end: str | None = None
    array: bool = False
    arguments: str = "arguments"


HERMES = Tags("<tool_call>", "</tool_call>")
MISTRAL = Tags("[TOOL_CALLS]", array=True)
LLAMA3 = Tags('{"name"', arguments="parameters")


class TaggedOutput:
    """Content until the format's start marker, then tool calls; text after the calls is kept
    as content too. A partial marker at the end of a piece is held back until it is decided."""

    def __init__(self, tags: Tags) -> None:
        self._tags = tags
        self._held = ""  # text that may be the start of a marker
        self._content: list[str] = []
        self._calls = _Calls()
        self._stream: JsonStream | None = None
        self._closing = False  # a call's JSON is complete: its end marker comes next
        self._n_docs = 0

    def feed(self, text: str) -> list[Delta]:
        deltas: list[Delta] = []
        text = self._held + text
        self._held = ""
        while text:
            if self._closing:
                text = self._close(text)
            elif self._stream is None:
                text = self._outside(text, deltas)
            else:
                text = self._inside(text, deltas)
        return merge(deltas)

    def _close(self, text: str) -> str:
        end = self._tags.end or ""
        rest = text.lstrip()
        if not rest:
            return ""
        if end and end.startswith(rest) and rest != end:  # the end marker, still coming
            self._held = rest
            return ""
        self._closing = False
        return rest[len(end) :] if end and rest.startswith(end) else rest

    def _outside(self, text: str, deltas: list[Delta]) -> str:
        start = self._tags.start
        at = text.find(start)
        if at < 0:
            keep = _partial_suffix(text, start)
            emit, self._held = text[: len(text) - keep], text[len(text) - keep :]
            self._say(emit, deltas)
            return ""
        self._say(text[:at], deltas)
        self._stream = JsonStream(capture=self._is_arguments)
        self._n_docs += 1
        # The Llama 3 marker is the call's own beginning: it is part of the JSON.
        return (
            text[at:]
            if self._tags.end is None and not self._tags.array
            else text[at + len(start) :]
        )

    def _inside(self, text: str, deltas: list[Delta]) -> str:
        assert self._stream is not None
        for i, ch in enumerate(text):
            for event in self._stream.feed(ch):
                deltas += self._event(event)
            if self._stream.done or self._stream.broken:
                self._stream = None
                self._closing = self._tags.end is not None
                return text[i + 1 :]
        return ""

    def _event(self, event: Scalar | Closed) -> list[Delta]:
        path = event.path
        prefix = self._n_docs - 1
        call: Path = (prefix, *path[:1]) if self._tags.array else (prefix,)
        key = path[1] if self._tags.array and len(path) == 2 else path[0] if path else None
        depth = 2 if self._tags.array else 1
        if len(path) != depth:
            return []
        if key == "name":
            return self._calls.name(call, event)
        if key == self._tags.arguments and isinstance(event, Scalar):
            return self._calls.arguments(call, event.text)
        return []

    def _is_arguments(self, path: Path) -> bool:
        depth = 2 if self._tags.array else 1
        return len(path) == depth and path[-1] == self._tags.arguments

    def _say(self, text: str, deltas: list[Delta]) -> None:
        if self._calls.calls and not text.strip():
            return  # the space between calls, or after them
        if text:
            self._content.append(text)
            deltas.append({"content": text})

    def flush(self) -> list[Delta]:
        """The text held back for a marker that never came: content after all."""
        held, self._held = self._held, ""
        deltas: list[Delta] = []
        if held and self._stream is None and not self._closing:
            self._say(held, deltas)
        return deltas

    def finish(self) -> Message:
        self.flush()
        content = "".join(self._content)
        calls = self._calls.finished()
        return Message(content if content.strip() or not calls else None, calls)


def merge(deltas: list[Delta]) -> list[Delta]:
    """Consecutive content, or consecutive argument pieces of one call, as one delta."""
    merged: list[Delta] = []
    for delta in deltas:
        last = merged[-1] if merged else None
        if last is not None and "content" in last and "content" in delta:
            merged[-1] = {"content": last["content"] + delta["content"]}
        elif last is not None and _arguments_only(last) and _arguments_only(delta):
            a, b = last["tool_calls"][0], delta["tool_calls"][0]
            if a["index"] == b["index"]:
                text = a["function"]["arguments"] + b["function"]["arguments"]
                merged[-1] = {
                    "tool_calls": [{"index": a["index"], "function": {"arguments": text}}]
                }
                continue
            merged.append(delta)
        else:
            merged.append(delta)
    return merged


def _arguments_only(delta: Delta) -> bool:
    calls: list[dict[str, Any]] = delta.get("tool_calls") or []
    return bool(calls) and "id" not in calls[0]


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


Output = PlainOutput | GenericOutput | TaggedOutput
