"""JSON mode, tool calls and log probabilities, as IDE agents use them: the official OpenAI SDK
against the real daemon (and a WebSocket), every JSON answer parsed and every argument string
validated with `jsonschema`. Sampled at temperature 1.0: valid by construction, not by luck.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from starlette.testclient import TestClient
from websockets.sync.client import connect

from tests.conftest import Daemon
from thoxd.api.schemas import ChatRequest, parse
from thoxd.api.tools import plan_chat
from thoxd.app import create_app
from thoxd.catalog.entries import Catalog, ModelSpec
from thoxd.engine.templates import ChatTemplate
from thoxd.settings import Settings

MODEL = "thox-coder"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer"},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "role": {"enum": ["dev", "ops", "pm"]},
    },
    "required": ["name", "age", "languages", "role"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_code",
        "description": "Search the repository for a string.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "maxLength": 40}},
            "required": ["query"],
        },
    },
}
TOOLS = [WEATHER, SEARCH]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Daemon]:
    """Four slots: four constrained requests and free ones beside them, at once."""
    tmp = tmp_path_factory.mktemp("tools")
    daemon = Daemon(tmp, models_dir, "--slots", "4", "--queue-size", "8", "--mdns", "false")
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def client(box: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=box.url + "/v1", api_key="none", max_retries=0) as client:
        yield client


def _json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


def _check_calls(message: Any, allowed: set[str]) -> None:
    assert message.tool_calls, message
    ids = [call.id for call in message.tool_calls]
    assert len(set(ids)) == len(ids)
    for call in message.tool_calls:
        assert call.type == "function"
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


# -- the plan: what the template renders and the grammar enforces -------------------------------

HERMES_TEMPLATE = (
    "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% endfor %}<|assistant|>"
)


def _request(**fields: Any) -> ChatRequest:
    body = {"model": MODEL, "messages": ASK, **fields}
    request = parse(ChatRequest, body)
    request.check_supported()
    return request


def test_developer_is_system_and_plain_chat_has_no_grammar() -> None:
    messages = [{"role": "developer", "content": "Be brief."}, *ASK, {"role": "assistant"}]
    plan = plan_chat(_request(messages=messages), "gemma")
    assert plan.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": ASK[0]["content"]},
        {"role": "assistant", "content": ""},
    ]
    assert plan.grammar is None and plan.tools is None and not plan.generic


def test_generic_tools_are_described_and_history_is_json() -> None:
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}  # fmt: skip
    messages = [
        {"role": "system", "content": "You help."},
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
    ]
    plan = plan_chat(_request(messages=messages, tools=TOOLS), None)
    assert plan.generic and plan.tools is None and plan.grammar is not None
    system = plan.messages[0]["content"]
    assert system.startswith("You help.") and "get_weather" in system and '"response"' in system
    assert json.loads(plan.messages[2]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    }
    result = json.loads(plan.messages[3]["content"])["tool_response"]
    assert plan.messages[3]["role"] == "user"
    assert result == {"tool_call_id": "c1", "name": "get_weather", "content": "rain"}


def test_required_leaves_no_room_for_words() -> None:
    plan = plan_chat(_request(tools=TOOLS, tool_choice="required"), None)
    assert plan.grammar is not None and "response" not in plan.grammar.gbnf
    assert "response" not in plan.messages[0]["content"]


def test_a_template_with_its_own_format_gets_the_tools() -> None:
    auto = plan_chat(_request(tools=TOOLS), HERMES_TEMPLATE)
    assert not auto.generic and auto.tags is not None
    assert auto.tools is not None and auto.tools[0]["function"]["name"] == "get_weather"
    assert auto.grammar is not None and auto.grammar.lazy_patterns == ("<tool_call>",)
    forced = plan_chat(_request(tools=TOOLS, tool_choice="required"), HERMES_TEMPLATE)
    assert forced.grammar is not None and forced.grammar.lazy_patterns == ()
    rendered = ChatTemplate(HERMES_TEMPLATE).render(auto.messages, tools=auto.tools)
    assert rendered.startswith("<tools>[{") and '"get_weather"' in rendered


# -- JSON mode -----------------------------------------------------------------------------------


def test_json_object_always_parses(client: openai.OpenAI) -> None:
    def ask(seed: int) -> Any:
        return client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Describe a cat in JSON."}],
            response_format={"type": "json_object"},
            temperature=1.0,
            seed=seed,
            max_tokens=120,
        ).choices[0]

    with ThreadPoolExecutor(4) as pool:
        choices = list(pool.map(ask, range(4)))
    for choice in choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length"  # cut by max_tokens: may not parse


def test_json_schema_answers_validate_beside_free_requests(client: openai.OpenAI) -> None:
    """Four constrained requests and two free ones share steps: each keeps its own sampler."""

    def constrained(seed: int) -> Any:
        return client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Invent a colleague."}],
            response_format=_json_schema(PERSON),
            temperature=1.0,
            seed=seed,
            max_tokens=150,
        ).choices[0]

    def free(_: int) -> str:
        answer = client.completions.create(
            model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0,
            extra_body={"repeat_penalty": 1.0},
        )  # fmt: skip
        return answer.choices[0].text

    with ThreadPoolExecutor(6) as pool:
        constrained_answers = [pool.submit(constrained, seed) for seed in range(4)]
        free_answers = [pool.submit(free, i) for i in range(2)]
        choices = [f.result() for f in constrained_answers]
        texts = [f.result() for f in free_answers]
    stopped = [c for c in choices if c.finish_reason == "stop"]
    assert stopped, [c.message.content for c in choices]
    for choice in stopped:
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    for text in texts:  # the free requests were not constrained by their neighbours
        assert text.startswith(" 6, 7"), text


def test_json_schema_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a colleague."}],
        response_format=_json_schema(PERSON),
        temperature=1.0,
        max_tokens=150,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if chunks[-1].choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(text), PERSON)


def test_json_mode_on_text_completions(client: openai.OpenAI) -> None:
    answer = client.completions.create(
        model=MODEL,
        prompt="A user record:",
        max_tokens=100,
        temperature=1.0,
        extra_body={"response_format": {"type": "json_object"}},
    ).choices[0]
    if answer.finish_reason == "stop":
        assert isinstance(json.loads(answer.text), dict)


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "integer", "minimum": 1}, "minimum"),
        ({"type": "string", "format": "email"}, "email"),
        ({"type": "object", "properties": {"a": {"not": {}}}}, "not"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_it(
    client: openai.OpenAI, schema: dict[str, Any], named: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=ASK, response_format=_json_schema(schema), max_tokens=5
        )
    error = refused.value.body
    assert isinstance(error, dict)
    assert named in error["message"] and error["param"] == "response_format"


# -- tools ---------------------------------------------------------------------------------------


def test_a_named_tool_is_called_with_valid_arguments(client: openai.OpenAI) -> None:
    choice = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        temperature=1.0,
        max_tokens=120,
    ).choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message, {"get_weather"})


def test_required_calls_one_of_the_tools(client: openai.OpenAI) -> None:
    choice = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        max_tokens=120,
    ).choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message, {"get_weather", "search_code"})
    assert len(choice.message.tool_calls) == 1  # parallel_tool_calls false


def test_auto_answers_in_words_or_with_a_valid_call(client: openai.OpenAI) -> None:
    for seed in range(3):
        choice = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=120
        ).choices[0]
        if choice.finish_reason == "length":
            continue
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            _check_calls(choice.message, {"get_weather", "search_code"})
        else:
            assert choice.finish_reason == "stop"
            assert isinstance(choice.message.content, str)


def test_streamed_tool_calls_assemble_in_the_sdk(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        max_tokens=120,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message, {"get_weather", "search_code"})


def test_a_tool_result_goes_back_into_the_conversation(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=120,
    ).choices[0]  # fmt: skip
    call = first.message.tool_calls[0]
    messages: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 18, "sky": "clear"}'},
    ]
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=30
    ).choices[0]
    assert answer.message.tool_calls is None
    assert answer.finish_reason in ("stop", "length")


def test_tool_errors_name_the_field(client: openai.OpenAI) -> None:
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"minimum": 0}}}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tools": [bad_tool], "tool_choice": "required"}, "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
    ]  # fmt: skip
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **extra)
        assert isinstance(refused.value.body, dict)
        assert refused.value.body["param"] == param


# -- log probabilities ---------------------------------------------------------------------------


def test_chat_logprobs_shape_and_order(client: openai.OpenAI) -> None:
    choice = client.chat.completions.create(
        model=MODEL, messages=ASK, logprobs=True, top_logprobs=3, temperature=0, max_tokens=8
    ).choices[0]
    content = choice.logprobs.content
    assert content and len(content) <= 8
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert math.isclose(entry.logprob, tops[0], abs_tol=1e-5)  # greedy takes the likeliest
    assert "".join(e.token for e in content) == choice.message.content


def test_logprobs_after_the_grammar(client: openai.OpenAI) -> None:
    choice = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        response_format={"type": "json_object"},
        logprobs=True,
        top_logprobs=5,
        max_tokens=3,
    ).choices[0]
    first = choice.logprobs.content[0]
    # The grammar allows an object's opening only: every alternative it kept starts one.
    assert first.top_logprobs
    for alternative in first.top_logprobs:
        assert alternative.token.lstrip().startswith("{"), first.top_logprobs
    assert sum(math.exp(t.logprob) for t in first.top_logprobs) <= 1.0 + 1e-6


def test_completion_logprobs_streamed_and_not(client: openai.OpenAI) -> None:
    body: dict[str, Any] = {"model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 6, "temperature": 0}
    plain = client.completions.create(logprobs=2, **body).choices[0]
    assert plain.logprobs is not None
    assert "".join(plain.logprobs.tokens) == plain.text
    assert plain.logprobs.text_offset[0] == 0
    assert all(len(top) <= 2 for top in plain.logprobs.top_logprobs or [])
    chunks = list(client.completions.create(logprobs=2, stream=True, **body))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in
                c.choices[0].logprobs.tokens or []]  # fmt: skip
    assert streamed == plain.logprobs.tokens


# -- the WebSocket -------------------------------------------------------------------------------


def test_json_schema_and_tool_calls_over_the_websocket(box: Daemon) -> None:
    url = box.url.replace("http", "ws") + "/v1/stream"
    with connect(url) as ws:
        ws.send(json.dumps({
            "id": "j", "model": MODEL, "temperature": 1.0, "max_tokens": 150,
            "messages": [{"role": "user", "content": "Invent a colleague."}],
            "response_format": _json_schema(PERSON),
        }))  # fmt: skip
        ws.send(json.dumps({
            "id": "t", "model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 120,
            "tool_choice": "required", "parallel_tool_calls": False,
        }))  # fmt: skip
        text, calls, done = "", {}, {}
        while len(done) < 2:
            event = json.loads(ws.recv(timeout=120))
            assert event["type"] in ("delta", "done"), event
            if event["type"] == "done":
                done[event["id"]] = event
                continue
            delta = event["choices"][0]["delta"]
            if event["id"] == "j":
                text += delta.get("content", "")
            for piece in delta.get("tool_calls", []):
                call = calls.setdefault(piece["index"], {"name": None, "arguments": ""})
                call["name"] = call["name"] or piece["function"].get("name")
                call["arguments"] += piece["function"].get("arguments", "")
    if done["j"]["finish_reason"] == "stop":
        jsonschema.validate(json.loads(text), PERSON)
    assert done["t"]["finish_reason"] == "tool_calls"
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])


# -- a model whose own template renders tools (Hermes/Qwen format) -------------------------------


@pytest.fixture(scope="module")
def hermes(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, default_spec: ModelSpec
) -> Iterator[openai.OpenAI]:
    """The app in-process with the default model's file behind a Hermes-style template: the
    model never learned the format, so every call it makes is the grammar's doing."""
    tmp = tmp_path_factory.mktemp("hermes")
    spec = default_spec.model_copy(
        update={"id": "hermes", "aliases": (), "chat_template": HERMES_TEMPLATE, "stop": ()}
    )
    catalog = Catalog([spec])
    settings = Settings(
        state_dir=tmp / "state", models_dir=models_dir, mdns=False, default_model="hermes"
    )
    app = create_app(settings, catalog=catalog)
    with TestClient(app, base_url="http://127.0.0.1:8080", client=("127.0.0.1", 1)) as http:
        yield openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="x", http_client=http)


def test_hermes_calls_are_enforced_and_read(hermes: openai.OpenAI) -> None:
    choice = hermes.chat.completions.create(
        model="hermes", messages=ASK, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, temperature=1.0, max_tokens=120,
    ).choices[0]  # fmt: skip
    assert choice.finish_reason == "tool_calls", choice
    _check_calls(choice.message, {"get_weather", "search_code"})


def test_hermes_streamed_calls_assemble(hermes: openai.OpenAI) -> None:
    with hermes.chat.completions.stream(
        model="hermes",
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "search_code"}},
        parallel_tool_calls=False,
        max_tokens=120,
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    _check_calls(final.choices[0].message, {"search_code"})
