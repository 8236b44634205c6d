"""thoxd/fleet/forward.py: what a forwarded answer says it used, read back for the ledger of the
box the client talks to."""

from __future__ import annotations

import json

from thoxd.fleet.forward import tokens_used


def _sse(*events: dict[str, object]) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def test_a_plain_answer_gives_its_usage() -> None:
    answer = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5}}
    assert tokens_used(json.dumps(answer).encode()) == (12, 5)
    embeddings = {"data": [], "usage": {"prompt_tokens": 7, "total_tokens": 7}}
    assert tokens_used(json.dumps(embeddings).encode()) == (7, 0)


def test_a_stream_gives_its_usage_chunk_or_else_its_last_timings() -> None:
    delta = {"choices": [{"delta": {"content": "x"}}]}
    last = {"choices": [{"finish_reason": "length"}],
            "timings": {"prompt_n": 3, "cache_n": 9, "predicted_n": 4}}  # fmt: skip
    assert tokens_used(_sse(delta, delta, last)) == (12, 4)
    usage = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 4}}
    assert tokens_used(_sse(delta, last, usage)) == (12, 4)
    # The kept end of a long stream may begin mid-line: that line is skipped.
    assert tokens_used(b'ent":"x"}}]}\n\n' + _sse(last)) == (12, 4)


def test_an_answer_without_usage_gives_none() -> None:
    assert tokens_used(b"") is None
    assert tokens_used(b'{"error": {"message": "no"}}') is None
    assert tokens_used(_sse({"choices": [{"delta": {"content": "x"}}]})) is None
