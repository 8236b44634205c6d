"""OpenAI response objects, built as plain dicts (the wire format is the contract)."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from thoxd import __version__
from thoxd.engine import Finished

FINGERPRINT = f"thoxd-{__version__}"
_MARK = "\x00thoxd\x00"  # stands for the text while a chunk template is encoded


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def total_usage(finished: list[Finished]) -> dict[str, int]:
    return usage(sum(f.prompt_tokens for f in finished), sum(f.completion_tokens for f in finished))


def timings(finished: list[Finished]) -> dict[str, Any]:
    """One choice's timings as they are; several choices' summed."""
    if len(finished) == 1:
        return finished[0].timings.as_dict()
    keys = ("cache_n", "prompt_n", "prompt_ms", "predicted_n", "predicted_ms")
    merged = [f.timings.as_dict() for f in finished]
    return {k: sum(m[k] for m in merged) for k in keys}


class Envelope:
    """The fields every object of one response shares: id, object, created, model."""

    def __init__(self, kind: str, model: str) -> None:
        chat = kind == "chat"
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.chat = chat
        self.model = model
        self.created = int(time.time())
        self._delta_templates: dict[int, tuple[str, str]] = {}

    def _head(self, object_name: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
        }

    def completion(self, texts: list[str], finished: list[Finished]) -> dict[str, Any]:
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": f.finish_reason,
                }
                for i, (text, f) in enumerate(zip(texts, finished, strict=True))
            ]
        else:
            choices = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": f.finish_reason}
                for i, (text, f) in enumerate(zip(texts, finished, strict=True))
            ]
        return {
            **self._head("chat.completion" if self.chat else "text_completion"),
            "choices": choices,
            "usage": total_usage(finished),
            "timings": timings(finished),
        }

    def chunk(
        self, index: int, text: str | None, finish_reason: str | None = None, *, role: bool = False
    ) -> dict[str, Any]:
        """One streamed piece of choice `index` (text None: an empty delta, e.g. the last)."""
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [choice]}

    def delta_event(self, index: int, text: str) -> str:
        """`data: <chunk>` for one token's text: the chunk's fixed parts are encoded once per
        response and only the text per token (this runs for every token streamed)."""
        halves = self._delta_templates.get(index)
        if halves is None:
            encoded = json.dumps(self.chunk(index, _MARK), separators=(",", ":"))
            head, tail = encoded.split(json.dumps(_MARK), 1)
            halves = self._delta_templates[index] = (f"data: {head}", f"{tail}\n\n")
        return halves[0] + json.dumps(text) + halves[1]

    def usage_chunk(self, finished: list[Finished]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": total_usage(finished)}
