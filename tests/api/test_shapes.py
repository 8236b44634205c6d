"""OpenAI response shapes, and the pre-encoded streaming chunk matching the plain one."""

from __future__ import annotations

import json

import pytest

from thoxd.api.shapes import Envelope


@pytest.mark.parametrize("kind", ["chat", "text"])
@pytest.mark.parametrize("text", ["", "plain", 'quotes " and \\ back', "new\nline", "é🙂", "\x00"])
def test_delta_event_is_the_chunk_encoded(kind: str, text: str) -> None:
    envelope = Envelope(kind, "thox-coder")
    event = envelope.delta_event(1, text)
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[6:]) == envelope.chunk(1, text)
    # The template is reused: a second token of the same choice encodes the same way.
    assert json.loads(envelope.delta_event(1, text + "!")[6:]) == envelope.chunk(1, text + "!")


def test_chat_and_text_chunks_have_openai_shapes() -> None:
    chat = Envelope("chat", "m").chunk(0, "hi", role=True)
    assert chat["object"] == "chat.completion.chunk"
    assert chat["choices"][0]["delta"] == {"role": "assistant", "content": "hi"}
    text = Envelope("text", "m").chunk(0, "hi", "stop")
    assert text["object"] == "text_completion"
    expected = {"index": 0, "text": "hi", "logprobs": None, "finish_reason": "stop"}
    assert text["choices"][0] == expected
