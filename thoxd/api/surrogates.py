"""Lone UTF-16 surrogates in decoded JSON: found, and where.

JSON may spell a UTF-16 surrogate alone ("\\ud800"); Python's json decodes it into a str that
cannot be encoded, so it would fail deep inside tokenizing, logging or sending. The request
parsers refuse it up front (thoxd.api.schemas), naming where it is.
"""

from __future__ import annotations

import json
import re
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")


def has_lone_surrogate(text: str) -> bool:
    return _SURROGATE.search(text) is not None


def lone_surrogate(data: object) -> tuple[int | str, ...] | None:
    """Where the first string holding a lone surrogate lies in decoded JSON, or None. For a key,
    the location of its object: the key itself cannot go into a message."""
    # Iterative, with each location kept as a link to its parent: linear whatever the depth.
    todo: list[tuple[object, tuple[Any, int | str] | None]] = [(data, None)]
    while todo:
        value, at = todo.pop()
        if isinstance(value, str):
            if has_lone_surrogate(value):
                return _unlink(at)
        elif isinstance(value, dict):
            for key in value:
                if isinstance(key, str) and has_lone_surrogate(key):
                    return _unlink(at)
            todo.extend((item, (at, key)) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            todo.extend((item, (at, i)) for i, item in reversed(list(enumerate(value))))
    return None


def _unlink(at: tuple[Any, int | str] | None) -> tuple[int | str, ...]:
    loc: list[int | str] = []
    while at is not None:
        at, part = at
        loc.append(part)
    return tuple(reversed(loc))


def surrogate_in_json(data: bytes | bytearray) -> tuple[int | str, ...] | None:
    # Only on the error path: pydantic's parser refuses a lone surrogate as "invalid JSON";
    # Python's accepts it, so a body it decodes is valid JSON with a string that is not Unicode.
    try:
        return lone_surrogate(json.loads(data))
    except (ValueError, RecursionError):
        return None
