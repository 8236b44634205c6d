"""The Responses API (`/v1/responses`, thoxd/api/responses*.py).

In-process, without a model: what a request is refused for (by name), how its items become chat
messages, how a chat output's deltas become output items and stream events. Against the real
daemon, with the official OpenAI SDK: plain and streamed answers, function calls and their
outputs, JSON by schema, `previous_response_id` chains, the stored responses, disconnects.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from starlette.applications import Starlette

from tests.conftest import Daemon
from tests.inproc import make_app, request
from thoxd.api.responses_items import InputItem, chat_messages, normal_items
from thoxd.api.responses_request import ResponsesRequest
from thoxd.api.responses_shapes import OutputItems
from thoxd.api.schemas import parse
from thoxd.catalog.entries import Catalog

MODEL = "thox-coder"
PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": PARAMETERS,
}
FORCED = {"type": "function", "name": "get_weather"}
ASK = "What is the weather in Paris right now?"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "role": {"enum": ["dev", "ops", "pm"]},
        "remote": {"type": "boolean"},
    },
    "required": ["name", "role", "remote"],
    "additionalProperties": False,
}


# -- the request, in-process: refused by name before any model is asked --------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, catalog: Catalog) -> Iterator[Starlette]:
    """The whole app, in-process: the requests sent to it are refused, most before any model
    loads (a schema the grammar cannot enforce is refused by the loaded model: closed after)."""
    app = make_app(tmp_path_factory.mktemp("responses"), catalog)
    yield app
    asyncio.run(app.state.engine.close())


def _post(app: Starlette, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "input": "Hi", **fields}
    return asyncio.run(request(app, "POST", "/v1/responses", json=body))


IMAGE = {"type": "input_image", "image_url": "http://example.com/cat.png"}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"background": True}, "background"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
        ({"reasoning": {"summary": "auto"}}, "reasoning.summary"),
        ({"truncation": "auto"}, "truncation"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"service_tier": "priority"}, "service_tier"),
        ({"max_tool_calls": 2}, "max_tool_calls"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"text": {"verbosity": "high"}}, "text.verbosity"),
        ({"tools": [WEATHER, {"type": "web_search"}]}, "tools[1]"),
        ({"tools": [{**WEATHER, "defer_loading": True}]}, "tools[0].defer_loading"),
        ({"tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "tool_choice"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "?"}, IMAGE]}]},
            "input[0].content[1]",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]"),
    ],
)
def test_what_the_api_defines_and_thoxd_does_not_do_is_refused_by_name(
    app: Starlette, fields: dict[str, Any], param: str
) -> None:
    refused = _post(app, **fields)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_parameter", param), error


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"input": 5}, "input"),
        ({"input": [{"role": "user"}]}, "input[0].content"),
        ({"input": [{"content": "no role, no type"}]}, "input[0]"),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
        ({"input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}]},
         "input[0].call_id"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"tools": [WEATHER], "text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"tools": [{**WEATHER, "name": "has space"}]}, "tools[0].name"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"text": {"format": {"type": "json_schema", "schema": {"type": "string",
                                                                  "minimum": 3}}}},
         "text.format"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"top_k": -1}, "top_k"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)  # fmt: skip
def test_bad_values_are_400_naming_the_param_as_this_api_names_it(
    app: Starlette, fields: dict[str, Any], param: str
) -> None:
    refused = _post(app, **fields)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_unknown_previous_response_is_openais_400(app: Starlette) -> None:
    refused = _post(app, previous_response_id="resp_nope")
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == (
        "previous_response_not_found",
        "previous_response_id",
    )


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_unknown_stored_responses_are_404(app: Starlette, method: str) -> None:
    for path in ("/v1/responses/resp_nope", "/v1/responses/resp_nope/input_items"):
        if method == "DELETE" and path.endswith("input_items"):
            continue
        missing = asyncio.run(request(app, method, path))
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "response_not_found"
    again = asyncio.run(request(app, "GET", "/v1/responses/resp_nope?stream=true"))
    assert again.status_code == 400 and again.json()["error"]["param"] == "stream"


# -- items, messages and output items ------------------------------------------------------------


def _request(**fields: Any) -> ResponsesRequest:
    body = parse(ResponsesRequest, {"model": MODEL, **fields})
    body.check_supported()
    return body


def test_items_become_chat_messages_with_calls_joining_their_message() -> None:
    body = _request(
        input=[
            {"role": "user", "content": ASK},
            {"type": "message", "role": "assistant", "content": "Let me look."},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1",
             "output": [{"type": "input_text", "text": "rain"}]},
        ],
        instructions="Be brief.",
    )  # fmt: skip
    items = normal_items(body.input or [])
    assert [item["id"].split("_")[0] for item in items] == ["msg", "msg", "fc", "fco"]
    assert items[1]["content"] == [
        {"type": "output_text", "text": "Let me look.", "annotations": []}
    ]
    messages = chat_messages(items)
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"}}  # fmt: skip
    assert messages == [
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
    ]
    chat = body.chat_request(messages)
    assert chat.messages[0].role == "system" and chat.messages[0].text() == "Be brief."
    assert len(chat.messages) == 4


def test_an_output_answers_a_call_made_earlier_in_the_chain() -> None:
    earlier = normal_items(
        [InputItem(type="function_call", call_id="c1", name="f", arguments="{}")]
    )
    answer = normal_items(
        [InputItem(type="function_call_output", call_id="c1", output=[])], earlier
    )
    assert answer[0]["call_id"] == "c1" and answer[0]["output"] == ""


def test_tools_text_format_and_tool_choice_take_the_chat_shapes() -> None:
    body = _request(
        input=ASK,
        tools=[WEATHER],
        tool_choice=FORCED,
        parallel_tool_calls=False,
        max_output_tokens=7,
    )
    chat = body.chat_request(chat_messages(normal_items(body.input or [])))
    assert chat.tools is not None and chat.tools[0].function.name == "get_weather"
    assert chat.tools[0].function.parameters == PARAMETERS
    assert chat.tool_choice is not None and not isinstance(chat.tool_choice, str)
    assert chat.tool_choice.function.name == "get_weather"
    assert (chat.parallel_tool_calls, chat.max_tokens) == (False, 7)
    schema = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    shaped = _request(input=ASK, text={"format": schema})
    fmt = shaped.chat_request([{"role": "user", "content": ASK}]).response_format
    assert fmt is not None and fmt.json_schema is not None
    assert (fmt.json_schema.name, fmt.json_schema.schema_) == ("person", PERSON)


def _call(index: int, call_id: str | None = None, arguments: str = "") -> dict[str, Any]:
    piece: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id is not None:
        piece.update(id=call_id, type="function", function={"name": "f", "arguments": ""})
    return {"tool_calls": [piece]}


def test_output_items_are_told_in_the_responses_order() -> None:
    items = OutputItems()
    events = items.feed([{"content": "\n"}])  # blank before a call: no message for it
    events += items.feed([_call(0, "call_1"), _call(0, arguments='{"a":')])
    events += items.feed([_call(0, arguments=" 1}"), {"content": "Done."}])
    events += items.finish(complete=True)
    assert [e["type"].removeprefix("response.") for e in events] == [
        "output_item.added",
        "function_call_arguments.delta",
        "function_call_arguments.delta",
        "function_call_arguments.done",
        "output_item.done",
        "output_item.added",
        "content_part.added",
        "output_text.delta",
        "output_text.done",
        "content_part.done",
        "output_item.done",
    ]
    call, message = items.items
    assert (call["call_id"], call["arguments"], call["status"]) == (
        "call_1",
        '{"a": 1}',
        "completed",
    )
    assert events[0]["item"]["arguments"] == "" and events[0]["item"]["status"] == "in_progress"
    assert message["content"][0]["text"] == "Done." and message["status"] == "completed"
    assert [e["output_index"] for e in events] == [0] * 5 + [1] * 6


def test_cut_short_items_are_incomplete_and_an_empty_answer_is_one_empty_message() -> None:
    cut = OutputItems()
    cut.feed([_call(0, arguments='{"a"'), _call(0, "call_1")])  # arguments before the name
    cut.finish(complete=False)
    assert [(i["arguments"], i["status"]) for i in cut.items] == [('{"a"', "incomplete")]
    empty = OutputItems()
    types = [e["type"] for e in empty.finish(complete=True)]
    assert types[0] == "response.output_item.added" and types[-1] == "response.output_item.done"
    assert [i["content"][0]["text"] for i in empty.items] == [""]


# -- the real daemon, through the SDK --------------------------------------------------------


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=daemon.url + "/v1", api_key="none", max_retries=0) as client:
        yield client


def test_create_answers_with_text_usage_and_its_settings(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model=MODEL,
        input="Say hello to Ada.",
        instructions="Be brief.",
        max_output_tokens=16,
        metadata={"case": "plain"},
        user="tester",
    )
    response = raw.parse()
    assert raw.headers["x-request-id"] == response.id
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == MODEL and response.error is None
    assert response.status in ("completed", "incomplete")
    assert response.output_text
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.status == response.status
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    usage = response.usage
    assert usage is not None
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert 0 < usage.output_tokens <= 16
    assert 0 <= usage.input_tokens_details.cached_tokens < usage.input_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert response.model_extra is not None
    assert response.model_extra["timings"]["predicted_n"] == usage.output_tokens
    assert (response.instructions, response.max_output_tokens) == ("Be brief.", 16)
    assert (response.metadata, response.user, response.store) == ({"case": "plain"}, "tester", True)
    assert response.temperature is not None and response.tool_choice == "auto"
    stored = client.responses.retrieve(response.id)
    assert stored.output_text == response.output_text and stored.usage == usage


def test_max_output_tokens_cuts_short_as_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL, input="Write a long story about a dragon and a knight.", max_output_tokens=3
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 3
    assert response.output[0].status == "incomplete"


def test_a_stream_tells_the_answer_in_order_and_its_deltas_make_the_text(
    client: openai.OpenAI,
) -> None:
    with client.responses.create(
        model=MODEL,
        input="Name three colors.",
        max_output_tokens=12,
        stream=True,
        stream_options={"include_obfuscation": True},
    ) as stream:
        events = list(stream)
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    last = "response.completed" if types[-1] == "response.completed" else "response.incomplete"
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        last,
    ]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    created, final = events[0], events[-1]
    assert created.type == "response.created" and final.type == last
    assert created.response.status == "in_progress" and created.response.output == []
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    text = "".join(e.delta for e in deltas)
    # Obfuscation asked for: each delta padded to a multiple of 32 characters.
    assert all((len(e.delta) + len(e.obfuscation)) % 32 == 0 for e in deltas)
    assert text and final.response.output_text == text
    done = events[-4]
    assert done.type == "response.output_text.done" and done.text == text
    item_ids = {getattr(e, "item_id", None) for e in events[3:-2]}
    assert item_ids == {final.response.output[0].id}
    # Stored as it was streamed.
    assert client.responses.retrieve(created.response.id).output_text == text


def test_a_forced_call_streams_and_its_output_continues_from_it(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=MODEL,
        input=ASK,
        tools=[WEATHER],
        tool_choice=FORCED,
        parallel_tool_calls=False,
        max_output_tokens=80,
    ) as stream:
        types = [event.type for event in stream]
        first = stream.get_final_response()  # the SDK's helper assembled it
    assert first.status == "completed" and types[-1] == "response.completed"
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and (call.id or "").startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), PARAMETERS)
    assert "response.function_call_arguments.delta" in types
    assert types.index("response.function_call_arguments.done") < types.index(
        "response.output_item.done"
    )
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": "18C, sunny"}
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,  # a streamed response is stored too
        input=[answer],
        tools=[WEATHER],
        max_output_tokens=16,
    )
    assert second.previous_response_id == first.id
    assert first.usage is not None and second.usage is not None
    # The same tools and question, then the call and its output.
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.output and {item.type for item in second.output} <= {"message", "function_call"}
    listed = client.responses.input_items.list(second.id, order="asc")
    assert [item.type for item in listed.data] == [
        "message",
        "function_call",
        "function_call_output",
    ]
    assert [getattr(item, "call_id", None) for item in listed.data][1:] == [call.call_id] * 2
    newest = client.responses.input_items.list(second.id, limit=1)
    assert [item.type for item in newest.data] == ["function_call_output"] and newest.has_more


def test_json_schema_answers_validate(client: openai.OpenAI) -> None:
    schema = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    response = client.responses.create(
        model=MODEL,
        input="Describe Ada, a remote developer, as JSON.",
        text={"format": schema},
        temperature=1.0,
        max_output_tokens=60,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), PERSON)
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"


class Person(BaseModel):
    name: str = Field(max_length=20)
    remote: bool


def test_the_sdks_parse_helper_gets_its_model_back(client: openai.OpenAI) -> None:
    parsed = client.responses.parse(
        model=MODEL, input="Ada works from home. Describe her.", text_format=Person,
        max_output_tokens=40,
    )  # fmt: skip
    assert parsed.status == "completed"
    assert isinstance(parsed.output_parsed, Person)


def test_previous_response_id_chains_without_the_old_instructions(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=MODEL,
        input="My name is Ada.",
        instructions="Answer in one short sentence.",
        max_output_tokens=8,
    )
    second = client.responses.create(
        model=MODEL, input="What is my name?", previous_response_id=first.id, max_output_tokens=8
    )
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.instructions is None and second.previous_response_id == first.id
    items = client.responses.input_items.list(second.id, order="asc").data
    assert [(item.type, getattr(item, "role", None)) for item in items] == [
        ("message", "user"),
        ("message", "assistant"),
        ("message", "user"),
    ]
    assert items[1].id == first.output[0].id


def test_values_that_ask_for_nothing_are_served(daemon: Daemon) -> None:
    neutral = {
        "background": False,
        "reasoning": {"effort": "none", "summary": None},
        "truncation": "disabled",
        "include": [],
        "service_tier": "auto",
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "store": False,
        "parallel_tool_calls": False,
        "tools": [WEATHER],
        "tool_choice": "auto",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "an_unknown_field": {"is": "ignored"},
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text",
                                                                 "text": "Be brief."}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather",
             "arguments": '{"city": "Oslo", "unit": "celsius"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "rain"},
        ],
    }  # fmt: skip
    body = {"model": MODEL, "max_output_tokens": 2, **neutral}
    served = httpx.post(daemon.url + "/v1/responses", json=body, timeout=120)
    assert served.status_code == 200, served.text
    assert served.json()["store"] is False and served.json()["parallel_tool_calls"] is False


def test_unstored_unknown_and_deleted_responses_are_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as unknown:
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_nope")
    assert unknown.value.code == "previous_response_not_found"
    unstored = client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=2)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="Again", previous_response_id=unstored.id)
    kept = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(kept.id)


def test_a_conversation_too_long_for_the_context_names_input(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="hello " * 9000, max_output_tokens=1)
    assert refused.value.code == "context_length_exceeded"
    assert refused.value.param == "input"


# A JSON string of at least 8000 characters: the answer cannot end before the client leaves.
ENDLESS = {
    "type": "json_schema",
    "name": "essay",
    "schema": {
        "type": "object",
        "properties": {"essay": {"type": "string", "minLength": 8000}},
        "required": ["essay"],
    },
}


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_the_slot(daemon: Daemon, stream: bool) -> None:
    body = {"model": MODEL, "input": "Write an essay.", "text": {"format": ENDLESS},
            "max_output_tokens": 4000, "stream": stream}  # fmt: skip
    payload = json.dumps(body).encode()
    cancelled = daemon.cancelled()
    sock = socket.create_connection(("127.0.0.1", daemon.port))
    try:
        sock.sendall(
            b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        deadline = time.monotonic() + 30
        while not daemon.busy():
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)
        if stream:
            received = b""
            while b"response.output_text.delta" not in received:
                received += sock.recv(4096)
    finally:
        sock.close()
    daemon.wait_idle(timeout=60)
    assert daemon.cancelled() == cancelled + 1  # stopped because the client left


def test_the_daemon_serves_on(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Hello", max_output_tokens=2)
    assert response.status in ("completed", "incomplete")
