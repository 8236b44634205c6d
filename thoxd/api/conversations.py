"""Stored responses, so that `previous_response_id` continues a conversation: in memory, bounded.

Each stored response keeps its whole conversation (the items before it, its input, its output),
so a chain needs only its last link: evicting an older response never breaks a later one. Items
are shared between the responses of a chain, never copied, and never changed once stored.

Bounded twice: at most `max_responses` responses and `max_bytes` of them (measured as their JSON,
conversation included, so a long chain counts its history again in every link: an upper bound),
least recently used evicted first. A response larger than `max_bytes` alone is not stored. The
store lives as long as the daemon: a restart forgets every response.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("thoxd.responses")

MAX_RESPONSES = 256
MAX_BYTES = 64 << 20

Item = dict[str, Any]


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # as it was sent
    inputs: tuple[Item, ...]  # what it answered: the earlier conversation, then its own input
    size: int

    @property
    def conversation(self) -> tuple[Item, ...]:
        """Everything a `previous_response_id` naming this response continues from."""
        return (*self.inputs, *self.response["output"])


class ResponseStore:
    """Responses by id, least recently used first out; one per daemon, made in create_app()."""

    def __init__(self, max_responses: int = MAX_RESPONSES, max_bytes: int = MAX_BYTES) -> None:
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self.bytes = 0
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._responses)

    def put(self, response: dict[str, Any], inputs: Sequence[Item]) -> bool:
        """Keep `response` (answering `inputs`); False when it is too large to keep at all."""
        size = _size(response) + sum(_size(item) for item in inputs)
        if size > self.max_bytes:
            logger.info("response %s not stored: %d bytes, over the bound", response["id"], size)
            return False
        self.delete(response["id"])
        self._responses[response["id"]] = StoredResponse(response, tuple(inputs), size)
        self.bytes += size
        while len(self._responses) > self.max_responses or self.bytes > self.max_bytes:
            _, evicted = self._responses.popitem(last=False)
            self.bytes -= evicted.size
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)  # continued or read: recently used
        return stored

    def delete(self, response_id: str) -> bool:
        stored = self._responses.pop(response_id, None)
        if stored is None:
            return False
        self.bytes -= stored.size
        return True


def _size(obj: Any) -> int:
    return len(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode())
