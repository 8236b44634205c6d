"""thoxd/api/toolcalls.py and jsonstream.py: tool calls read out of generated text, fed in pieces
of every size, streamed in OpenAI's delta shape and assembled into the final message."""

from __future__ import annotations

import json
from typing import Any

import pytest

from thoxd.api.jsonstream import Closed, JsonStream, Scalar, StringDecoder
from thoxd.api.toolcalls import HERMES, LLAMA3, MISTRAL, GenericOutput, Message, TaggedOutput

GENERIC_CALLS = (
    '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris \\"15e\\"", "days": [1,'
    ' 2]}}, {"name": "noop", "arguments": {}}]}'
)


def feed(output: Any, text: str, step: int) -> tuple[list[dict[str, Any]], Message]:
    deltas = []
    for i in range(0, len(text), step):
        deltas += output.feed(text[i : i + step])
    deltas += output.flush()
    return deltas, output.finish()


def assemble(deltas: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """What an SDK's stream helper builds from the deltas."""
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        for piece in d.get("tool_calls", []):
            call = calls.setdefault(piece["index"], {"arguments": ""})
            if "id" in piece:
                assert "name" not in call  # the header comes once, first
                call.update(id=piece["id"], name=piece["function"]["name"])
            call["arguments"] += piece["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("step", [1, 2, 7, 1000])
def test_generic_tool_calls_stream_and_assemble(step: int) -> None:
    deltas, message = feed(GenericOutput(), GENERIC_CALLS, step)
    content, calls = assemble(deltas)
    assert content == "" and message.content is None
    assert [c["name"] for c in calls] == ["get_weather", "noop"]
    assert json.loads(calls[0]["arguments"]) == {"city": 'Paris "15e"', "days": [1, 2]}
    assert [c["function"]["arguments"] for c in message.tool_calls] == [
        c["arguments"] for c in calls
    ]
    assert [c["id"] for c in message.tool_calls] == [c["id"] for c in calls]
    assert all(c["id"].startswith("call_") for c in calls)


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_generic_response_streams_as_content(step: int) -> None:
    text = '{"response": "Caf\\u00e9 \\ud83d\\ude00 \\"quoted\\"\\nline"}'
    deltas, message = feed(GenericOutput(), text, step)
    content, calls = assemble(deltas)
    assert content == message.content == 'Café 😀 "quoted"\nline'
    assert calls == [] and message.tool_calls == []


def test_generic_output_cut_short_is_kept_as_text() -> None:
    _, message = feed(GenericOutput(), '{"tool_calls": [{"name": "get_weather", "argu', 5)
    assert message.tool_calls == []
    assert message.content == '{"tool_calls": [{"name": "get_weather", "argu'


HERMES_TEXT = (
    "Let me look.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "<tool_call>"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>'
)


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_hermes_content_then_calls(step: int) -> None:
    deltas, message = feed(TaggedOutput(HERMES), HERMES_TEXT, step)
    content, calls = assemble(deltas)
    assert content == message.content == "Let me look.\n"
    assert [c["name"] for c in calls] == ["get_weather", "noop"]
    assert json.loads(calls[0]["arguments"]) == {"city": "<tool_call>"}
    assert len(message.tool_calls) == 2


@pytest.mark.parametrize("step", [1, 1000])
def test_text_that_only_looks_like_a_marker_is_content(step: int) -> None:
    text = "Use <tool tags> or <tool_"
    deltas, message = feed(TaggedOutput(HERMES), text, step)
    assert assemble(deltas) == (text, [])
    assert message.content == text and message.tool_calls == []


def test_mistral_and_llama3_formats() -> None:
    text = '[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]'
    _, message = feed(TaggedOutput(MISTRAL), text, 3)
    assert [c["function"]["name"] for c in message.tool_calls] == ["a", "b"]
    assert message.content is None
    _, message = feed(TaggedOutput(LLAMA3), '{"name": "a", "parameters": {"x": [1, {}]}}', 2)
    assert message.tool_calls[0]["function"]["arguments"] == '{"x": [1, {}]}'


def test_json_stream_reports_paths_and_captures_raw_text() -> None:
    stream = JsonStream(capture=lambda path: path == ("args",))
    events = stream.feed('{"name": "x", "args": {"a": "}"}, "n": 12}')
    assert Scalar(("name",), '"x"') in events
    assert Scalar(("args",), '{"a": "}"}') in events
    assert Scalar(("n",), "12") in events
    assert events[-1] == Closed(())
    assert stream.done


def test_string_decoder_holds_back_incomplete_escapes() -> None:
    decoder = StringDecoder()
    pieces = [decoder.feed(part) for part in ['"a\\', "u00", "e9b\\ud83d", "\\ude00", '"']]
    assert pieces == ["a", "", "éb", "😀", ""]
