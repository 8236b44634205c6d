"""OpenAI response objects, built as plain dicts (the wire format is the contract)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from thoxd import __version__
from thoxd.api.toolcalls import Message
from thoxd.engine import Finished, TokenLogprob

FINGERPRINT = f"thoxd-{__version__}"
_MARK = "\x00thoxd\x00"  # stands for the text while a chunk template is encoded


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # The prompt's start found in the prefix cache (timings.cache_n), as OpenAI reports it.
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},  # no model here reasons apart
    }


def total_usage(finished: Sequence[Finished], n: int = 1) -> dict[str, Any]:
    """Usage of a response's choices, in choice order: a prompt's tokens count once however many
    choices (`n`) came from it, as OpenAI counts them."""
    firsts = finished[::n]
    return usage(
        sum(f.prompt_tokens for f in firsts),
        sum(f.completion_tokens for f in finished),
        sum(f.timings.cache_n for f in firsts),
    )


def timings(finished: list[Finished]) -> dict[str, Any]:
    """One choice's timings as they are; several choices' summed."""
    if len(finished) == 1:
        return finished[0].timings.as_dict()
    keys = ("cache_n", "prompt_n", "prompt_ms", "predicted_n", "predicted_ms")
    merged = [f.timings.as_dict() for f in finished]
    return {k: sum(m[k] for m in merged) for k in keys}


class Envelope:
    """The fields every object of one response shares: id, object, created, model."""

    def __init__(self, kind: str, model: str, n: int = 1) -> None:
        chat = kind == "chat"
        self.n = n  # choices per prompt
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

    def completion(self, choices: list[Choice]) -> dict[str, Any]:
        """The whole answer: one choice per prompt (or per chat choice), as finished."""
        finished = [c.finished for c in choices]
        if self.chat:
            body = [
                {
                    "index": i,
                    "message": _message(c.message),
                    "logprobs": chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(choices)
            ]
        else:
            body = [
                {
                    "index": i,
                    "text": c.message.content or "",
                    "logprobs": (
                        text_logprobs(c.logprobs, c.offset) if c.logprobs is not None else None
                    ),
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(choices)
            ]
        return {
            **self._head("chat.completion" if self.chat else "text_completion"),
            "choices": body,
            "usage": total_usage(finished, self.n),
            "timings": timings(finished),
        }

    def chunk(
        self,
        index: int,
        delta: dict[str, Any] | None,
        finish_reason: str | None = None,
        *,
        role: bool = False,
        logprobs: list[TokenLogprob] | None = None,
        offset: int = 0,
    ) -> dict[str, Any]:
        """One streamed piece of choice `index`: a chat delta (content, or tool call pieces), or
        for a text completion {"content": text}; None: an empty delta, e.g. the last."""
        delta = delta or {}
        if self.chat:
            shown = {"role": "assistant", **delta} if role else dict(delta)
            choice: dict[str, Any] = {"index": index, "delta": shown}
            choice["logprobs"] = chat_logprobs(logprobs) if logprobs is not None else None
        else:
            choice = {"index": index, "text": delta.get("content", "")}
            choice["logprobs"] = text_logprobs(logprobs, offset) if logprobs is not None else None
        choice["finish_reason"] = finish_reason
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [choice]}

    def delta_event(self, index: int, text: str) -> str:
        """`data: <chunk>` for one token's text: the chunk's fixed parts are encoded once per
        response and only the text per token (this runs for every token streamed)."""
        halves = self._delta_templates.get(index)
        if halves is None:
            encoded = json.dumps(self.chunk(index, {"content": _MARK}), separators=(",", ":"))
            head, tail = encoded.split(json.dumps(_MARK), 1)
            halves = self._delta_templates[index] = (f"data: {head}", f"{tail}\n\n")
        return halves[0] + json.dumps(text) + halves[1]

    def usage_chunk(self, finished: Sequence[Finished]) -> dict[str, Any]:
        """The last chunk of a stream; `finished` in choice order."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": total_usage(finished, self.n)}


@dataclass
class Choice:
    """One finished choice: its message (a text completion's text is its content), the
    tokens' log probabilities if asked for, and how it ended."""

    message: Message
    finished: Finished
    logprobs: list[TokenLogprob] | None = None
    offset: int = 0  # where the generated text starts in a text completion (after an echo)

    @property
    def finish_reason(self) -> str:
        reason = self.finished.finish_reason
        return "tool_calls" if self.message.tool_calls and reason == "stop" else reason


def _message(message: Message) -> dict[str, Any]:
    shown: dict[str, Any] = {"role": "assistant", "content": message.content}
    if message.tool_calls:
        shown["tool_calls"] = message.tool_calls
    return shown


def _token(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat shape: per token its text, bytes, log probability and the top others."""
    content = [
        {
            "token": _token(e.token),
            "logprob": e.logprob,
            "bytes": list(e.token),
            "top_logprobs": [
                {"token": _token(t), "logprob": lp, "bytes": list(t)} for t, lp in e.top
            ],
        }
        for e in entries
    ]
    return {"content": content, "refusal": None}


def text_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, and each token's offset in the text."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(_token(e.token))
    top = []
    for e in entries:
        alternatives: dict[str, float] = {}
        for t, lp in e.top:
            alternatives.setdefault(_token(t), lp)  # two tokens may read the same
        top.append(alternatives)
    return {
        "tokens": [_token(e.token) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }
