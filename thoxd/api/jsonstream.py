"""A JSON document read as it is generated, character by character, for streaming tool calls.

The scanner follows the document's structure (objects, arrays, strings, the key each value
belongs to) and reports, as text arrives, where each piece of text lies:

    Scalar(path, text)   raw text of a scalar value (a string's quotes and escapes included),
                         in pieces as they come
    Closed(path)         the value at `path` is complete

A client of it asks for the paths it cares about: a tool call's name once complete, its arguments'
raw text as it grows. Values of a `capture` path are reported as raw text whole (objects and
arrays included), so a tool call's arguments stream exactly as the model wrote them.

It trusts its input to be JSON (a grammar made sure) and stops reporting at the first character
that cannot continue a document.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Scalar:
    path: Path
    text: str


@dataclass(frozen=True)
class Closed:
    path: Path


Event = Scalar | Closed


@dataclass
class _Frame:
    kind: str  # "object" | "array"
    path: Path
    key: str | None = None  # the current member's key, once read
    index: int = -1  # the current element's index
    expect_key: bool = True  # in an object: the next string is a key


class JsonStream:
    """Feed text with `feed`; iterate what it reported. `capture(path)` says whether the value
    at `path` is wanted as raw text whole (then nothing inside it is reported separately)."""

    def __init__(self, capture: Callable[[Path], bool] = lambda path: False) -> None:
        self._capture = capture
        self._stack: list[_Frame] = []
        self._in_string = False
        self._escape = False
        self._key_buf: list[str] | None = None  # a key being read
        self._scalar: Path | None = None  # the path of the scalar (or captured value) being read
        self._depth_in_capture = 0
        self._capture_string = False
        self.done = False  # the top-level value is complete
        self.broken = False

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        for ch in text:
            if self.done or self.broken:
                break
            events.extend(self._char(ch))
        return _merge(events)

    # -- one character ----------------------------------------------------------------------

    def _char(self, ch: str) -> Iterator[Event]:
        if self._scalar is not None and self._depth_in_capture:
            yield from self._captured(ch)
            return
        if self._in_string:
            yield from self._string_char(ch)
            return
        if self._scalar is not None:  # a number, true, false or null going on
            if ch in ",]} \t\r\n":
                yield from self._end_value()
                yield from self._structural(ch)
            else:
                yield Scalar(self._scalar, ch)
            return
        yield from self._structural(ch)

    def _structural(self, ch: str) -> Iterator[Event]:
        if ch in " \t\r\n":
            return
        frame = self._stack[-1] if self._stack else None
        if frame is not None and frame.kind == "object" and frame.expect_key:
            if ch == '"':
                self._in_string, self._key_buf = True, []
            elif ch == "}":
                yield from self._close()
            elif ch != ",":
                self.broken = True
            return
        if ch == ":" and frame is not None and frame.kind == "object":
            return
        if ch == ",":
            if frame is not None and frame.kind == "object":
                frame.expect_key = True
            return
        if ch in "]}":
            yield from self._close()
            return
        path = self._value_path()
        if self._capture(path):
            self._scalar, self._depth_in_capture = path, 1
            self._capture_string = ch == '"'
            if ch not in '[{"':
                self._depth_in_capture = 0  # a captured number or literal: read as a scalar
            yield Scalar(path, ch)
            return
        if ch == "{":
            self._stack.append(_Frame("object", path))
        elif ch == "[":
            self._stack.append(_Frame("array", path, expect_key=False))
        elif ch == '"':
            self._in_string, self._scalar = True, path
            yield Scalar(path, ch)
        else:
            self._scalar = path
            yield Scalar(path, ch)

    def _value_path(self) -> Path:
        if not self._stack:
            return ()
        frame = self._stack[-1]
        if frame.kind == "array":
            frame.index += 1
            return (*frame.path, frame.index)
        assert frame.key is not None
        return (*frame.path, frame.key)

    def _string_char(self, ch: str) -> Iterator[Event]:
        closing = ch == '"' and not self._escape
        self._escape = ch == "\\" and not self._escape
        if self._key_buf is not None:
            if closing:
                frame = self._stack[-1]
                frame.key = _unescape("".join(self._key_buf))
                frame.expect_key = False
                self._in_string, self._key_buf = False, None
            else:
                self._key_buf.append(ch)
            return
        assert self._scalar is not None
        yield Scalar(self._scalar, ch)
        if closing:
            self._in_string = False
            yield from self._end_value()

    def _captured(self, ch: str) -> Iterator[Event]:
        """Inside a captured object, array or string: track depth only, report raw text."""
        assert self._scalar is not None
        yield Scalar(self._scalar, ch)
        if self._capture_string or self._in_string:
            closing = ch == '"' and not self._escape
            self._escape = ch == "\\" and not self._escape
            if closing:
                self._in_string = False
                if self._capture_string:
                    self._depth_in_capture = 0
                    yield from self._end_value()
            return
        if ch == '"':
            self._in_string = True
        elif ch in "[{":
            self._depth_in_capture += 1
        elif ch in "]}":
            self._depth_in_capture -= 1
            if not self._depth_in_capture:
                yield from self._end_value()

    def _end_value(self) -> Iterator[Event]:
        assert self._scalar is not None
        path, self._scalar = self._scalar, None
        self._capture_string = False
        yield Closed(path)
        if not self._stack:
            self.done = True

    def _close(self) -> Iterator[Event]:
        if not self._stack:
            self.broken = True
            return
        frame = self._stack.pop()
        yield Closed(frame.path)
        if not self._stack:
            self.done = True


def _merge(events: list[Event]) -> list[Event]:
    """Consecutive text of one path as one Scalar."""
    merged: list[Event] = []
    for event in events:
        last = merged[-1] if merged else None
        if isinstance(event, Scalar) and isinstance(last, Scalar) and last.path == event.path:
            merged[-1] = Scalar(event.path, last.text + event.text)
        else:
            merged.append(event)
    return merged


def _unescape(text: str) -> str:
    try:
        return str(json.loads(f'"{text}"'))
    except ValueError:
        return text


class StringDecoder:
    """A JSON string's content from its raw text as it streams in (quotes and escapes
    included): decoded characters as soon as they are whole."""

    def __init__(self) -> None:
        self._pending = ""
        self._opened = False

    def feed(self, raw: str) -> str:
        out: list[str] = []
        text = self._pending + raw
        self._pending = ""
        i = 0
        if not self._opened and text.startswith('"'):
            self._opened, i = True, 1
        while i < len(text):
            ch = text[i]
            if ch == "\\":
                if i + 1 >= len(text):
                    self._pending = text[i:]
                    break
                if text[i + 1] == "u":
                    if i + 6 > len(text):
                        self._pending = text[i:]
                        break
                    code = int(text[i + 2 : i + 6], 16)
                    if 0xD800 <= code < 0xDC00:  # a surrogate pair: both halves first
                        if i + 12 > len(text):
                            self._pending = text[i:]
                            break
                        low = int(text[i + 8 : i + 12], 16)
                        out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                        i += 12
                        continue
                    out.append(chr(code))
                    i += 6
                    continue
                out.append(_ESCAPES.get(text[i + 1], text[i + 1]))
                i += 2
                continue
            if ch == '"':  # the closing quote
                break
            out.append(ch)
            i += 1
        return "".join(out)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/", "\\": "\\", '"': '"'}
