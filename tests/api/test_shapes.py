"""OpenAI response shapes, and the pre-encoded streaming chunk matching the plain one."""

from __future__ import annotations

import json

import pytest

from thoxd.api.shapes import Envelope
from thoxd.engine import TokenLogprob


@pytest.mark.parametrize("kind", ["chat", "text"])
@pytest.mark.parametrize("text", ["", "plain", 'quotes " and \\ back', "new\nline", "é🙂", "\x00"])
def test_delta_event_is_the_chunk_encoded(kind: str, text: str) -> None:
    envelope = Envelope(kind, "thox-coder")
    event = envelope.delta_event(1, text)
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[6:]) == envelope.chunk(1, {"content": text})
    # The template is reused: a second token of the same choice encodes the same way.
    again = json.loads(envelope.delta_event(1, text + "!")[6:])
    assert again == envelope.chunk(1, {"content": text + "!"})


def test_chat_and_text_chunks_have_openai_shapes() -> None:
    chat = Envelope("chat", "m").chunk(0, {"content": "hi"}, role=True)
    assert chat["object"] == "chat.completion.chunk"
    assert chat["choices"][0]["delta"] == {"role": "assistant", "content": "hi"}
    text = Envelope("text", "m").chunk(0, {"content": "hi"}, "stop")
    assert text["object"] == "text_completion"
    expected = {"index": 0, "text": "hi", "logprobs": None, "finish_reason": "stop"}
    assert text["choices"][0] == expected


def test_tool_call_deltas_and_logprobs_in_chunks() -> None:
    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "f", "arguments": ""}}  # fmt: skip
    chunk = Envelope("chat", "m").chunk(0, {"tool_calls": [call]})
    assert chunk["choices"][0]["delta"] == {"tool_calls": [call]}
    entry = TokenLogprob(b"hi", -0.5, ((b"hi", -0.5), (b"ho", -1.5)))
    chat = Envelope("chat", "m").chunk(0, {"content": "hi"}, logprobs=[entry])
    assert chat["choices"][0]["logprobs"]["content"] == [
        {"token": "hi", "logprob": -0.5, "bytes": [104, 105], "top_logprobs": [
            {"token": "hi", "logprob": -0.5, "bytes": [104, 105]},
            {"token": "ho", "logprob": -1.5, "bytes": [104, 111]}]}
    ]  # fmt: skip
    text = Envelope("text", "m").chunk(0, {"content": "hi"}, logprobs=[entry], offset=7)
    assert text["choices"][0]["logprobs"] == {
        "tokens": ["hi"], "token_logprobs": [-0.5],
        "top_logprobs": [{"hi": -0.5, "ho": -1.5}], "text_offset": [7],
    }  # fmt: skip
