"""thoxd/api/schemas.py: request bodies, and 400s that name the offending param."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from thoxd.api.schemas import ChatRequest, CompletionRequest, EmbeddingRequest, ModelAction, parse
from thoxd.errors import InvalidRequest, UnsupportedParameter

USER = {"role": "user", "content": "Hello"}


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "thox-coder", "messages": [USER], **fields}).encode()


def refused(model: type[Any], body: bytes | dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse(model, body)
    assert info.value.status == 400
    return info.value


def test_valid_chat_with_string_content() -> None:
    req = parse(ChatRequest, chat(temperature=0.5, max_tokens=16, stream=True))
    assert req.model == "thox-coder"
    assert req.messages[0].text() == "Hello"
    assert req.temperature == 0.5
    assert req.max_tokens == 16
    assert req.stream is True
    assert req.n == 1


def test_valid_chat_with_text_content_parts() -> None:
    message = {
        "role": "user",
        "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
    }
    req = parse(ChatRequest, chat(messages=[message]))
    assert req.messages[0].text() == "Hello"


def test_integer_temperature_is_accepted() -> None:
    # JSON has one number type; clients send `"temperature": 1`.
    assert parse(ChatRequest, chat(temperature=1)).temperature == 1.0


def test_unknown_fields_are_ignored() -> None:
    req = parse(ChatRequest, chat(logit_bias={"1": 2}, parallel_tool_calls=False, foo="bar"))
    assert not hasattr(req, "foo")
    assert req.model == "thox-coder"


def test_parse_accepts_a_decoded_object() -> None:
    req = parse(ChatRequest, json.loads(chat(top_p=0.9)))
    assert req.top_p == 0.9


def test_malformed_json() -> None:
    error = refused(ChatRequest, b'{"model": "x", "messages": [')
    assert error.param is None
    assert "not valid JSON" in error.message


@pytest.mark.parametrize("body", [b"[]", b'"hello"', b"42", b"null"])
def test_non_object_body(body: bytes) -> None:
    error = refused(ChatRequest, body)
    assert error.param is None
    assert "JSON object" in error.message


def test_missing_required_field_names_it() -> None:
    assert refused(ChatRequest, b'{"messages": [{"role": "user", "content": "x"}]}').param == (
        "model"
    )
    assert refused(ChatRequest, b'{"model": "m"}').param == "messages"


def test_empty_messages_refused() -> None:
    assert refused(ChatRequest, chat(messages=[])).param == "messages"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "0.5"),
        ("max_tokens", True),
        ("max_tokens", 1.5),
        ("stream", "yes"),
        ("top_k", "40"),
        ("seed", 1.0),
        ("model", 7),
    ],
)
def test_wrong_type_names_the_param(field: str, value: Any) -> None:
    error = refused(ChatRequest, chat(**{field: value}))
    assert error.param == field
    assert f"'{field}'" in error.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 3),
        ("temperature", -0.1),
        ("top_p", 2),
        ("max_tokens", 0),
        ("presence_penalty", 2.5),
        ("repeat_penalty", 0),
    ],
)
def test_out_of_range_names_the_param(field: str, value: Any) -> None:
    assert refused(ChatRequest, chat(**{field: value})).param == field


@pytest.mark.parametrize("n", [0, 129, "2"])
def test_n_out_of_range_names_n(n: object) -> None:
    # The model's slot count bounds it further (start.py); 1..128 passes the schema.
    assert refused(ChatRequest, chat(n=n)).param == "n"
    assert parse(ChatRequest, chat(n=128)).n == 128


def test_logit_bias_keys_are_token_ids() -> None:
    body = parse(ChatRequest, chat(logit_bias={"15": -100, "7": 2.5}))
    assert body.bias == ((15, -100.0), (7, 2.5))
    for bad in ({"x": 1}, {"-1": 1}, {"1.5": 1}, {"5": 101}, {"5": "1"}):
        assert refused(ChatRequest, chat(logit_bias=bad)).param.startswith("logit_bias")
    many = {str(i): 1 for i in range(1025)}
    assert (
        "1024"
        in refused(CompletionRequest, {"model": "m", "prompt": "p", "logit_bias": many}).message
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("store", True),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("prediction", {"type": "content", "content": "x"}),
        ("reasoning_effort", "high"),
        ("verbosity", "low"),
        ("service_tier", "flex"),
        ("store", 1),
        ("web_search_options", {}),
    ],
)
def test_defined_but_not_honoured_fields_are_named(field: str, value: object) -> None:
    error = refused(ChatRequest, chat(**{field: value}))
    assert isinstance(error, UnsupportedParameter) and error.param == field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("store", False),
        ("modalities", ["text"]),
        ("service_tier", "auto"),
        ("reasoning_effort", "none"),
        ("metadata", {"k": "v"}),
        ("prompt_cache_key", "x"),
        ("safety_identifier", "u1"),
        ("no_such_field", 1),
    ],
)
def test_fields_that_ask_for_nothing_pass(field: str, value: object) -> None:
    assert parse(ChatRequest, chat(**{field: value})).model == "thox-coder"
    assert parse(ChatRequest, json.loads(chat(**{field: value}))).model == "thox-coder"


def test_best_of_is_refused_on_completions() -> None:
    body = {"model": "m", "prompt": "p", "best_of": 3}
    assert refused(CompletionRequest, body).param == "best_of"
    assert parse(CompletionRequest, {**body, "best_of": 1}).prompt == "p"


def test_embeddings_dimensions_is_a_positive_integer() -> None:
    assert parse(EmbeddingRequest, {"model": "m", "input": "x", "dimensions": 64}).dimensions == 64
    assert (
        refused(EmbeddingRequest, {"model": "m", "input": "x", "dimensions": 0}).param
        == "dimensions"
    )


def test_more_than_four_stop_strings() -> None:
    error = refused(ChatRequest, chat(stop=["a", "b", "c", "d", "e"]))
    assert error.param == "stop"
    assert "4" in error.message


def test_empty_stop_string_is_refused() -> None:
    assert refused(ChatRequest, chat(stop="")).param == "stop"


def test_nested_param_name() -> None:
    error = refused(ChatRequest, chat(messages=[USER, {"role": "user", "content": 5}]))
    assert error.param == "messages[1].content"
    error = refused(ChatRequest, chat(messages=[{"role": "wizard", "content": "x"}]))
    assert error.param == "messages[0].role"
    part = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    assert refused(ChatRequest, chat(messages=[part])).param == "messages[0].content"


def test_nested_stream_options_param() -> None:
    error = refused(ChatRequest, chat(stream_options={"include_usage": "yes"}))
    assert error.param == "stream_options.include_usage"


@pytest.mark.parametrize(
    "prompt",
    ["Once upon a time", ["one", "two"], [1, 2, 3], [[1, 2], [3]]],
    ids=["string", "strings", "token-ids", "token-lists"],
)
def test_completion_prompt_forms(prompt: Any) -> None:
    req = parse(CompletionRequest, {"model": "m", "prompt": prompt})
    assert req.prompt == prompt


@pytest.mark.parametrize(
    "prompt", [[], [-1], [[]], 5, [1, "a"], ["x"] * 65], ids=lambda p: repr(p)[:20]
)
def test_completion_bad_prompt_names_prompt(prompt: Any) -> None:
    error = refused(CompletionRequest, {"model": "m", "prompt": prompt})
    assert error.param is not None
    assert error.param.startswith("prompt")


def test_completion_long_token_list_is_one_prompt() -> None:
    req = parse(CompletionRequest, {"model": "m", "prompt": list(range(500))})
    assert len(req.prompt) == 500


@pytest.mark.parametrize(
    "value", ["text", ["a", "b"], [1, 2], [[1], [2, 3]]], ids=lambda p: repr(p)[:20]
)
def test_embedding_input_forms(value: Any) -> None:
    req = parse(EmbeddingRequest, {"model": "m", "input": value})
    assert req.input == value
    assert req.encoding_format == "float"


def test_embedding_bad_input_and_format() -> None:
    assert refused(EmbeddingRequest, {"model": "m", "input": []}).param == "input"
    error = refused(EmbeddingRequest, {"model": "m", "input": "x", "encoding_format": "hex"})
    assert error.param == "encoding_format"


def test_stops_property() -> None:
    assert parse(ChatRequest, chat()).stops == ()
    assert parse(ChatRequest, chat(stop="END")).stops == ("END",)
    assert parse(ChatRequest, chat(stop=["a", "b"])).stops == ("a", "b")


def test_token_limit_prefers_max_completion_tokens() -> None:
    assert parse(ChatRequest, chat()).token_limit is None
    assert parse(ChatRequest, chat(max_tokens=10)).token_limit == 10
    assert parse(ChatRequest, chat(max_completion_tokens=20)).token_limit == 20
    both = parse(ChatRequest, chat(max_tokens=10, max_completion_tokens=20))
    assert both.token_limit == 20


def test_include_usage_property() -> None:
    assert parse(ChatRequest, chat()).include_usage is False
    assert parse(ChatRequest, chat(stream_options={})).include_usage is False
    on = parse(ChatRequest, chat(stream=True, stream_options={"include_usage": True}))
    assert on.include_usage is True


# ---------------------------------------------------------------- keep_alive and /models/*

# One valid body of each kind that takes keep_alive, without it.
KEEP_ALIVE_BODIES: list[tuple[type[Any], dict[str, Any]]] = [
    (ChatRequest, {"model": "m", "messages": [USER]}),
    (CompletionRequest, {"model": "m", "prompt": "Once"}),
    (EmbeddingRequest, {"model": "m", "input": "text"}),
]
KEEP_ALIVE_IDS = ["chat", "completion", "embedding"]


@pytest.mark.parametrize(("model", "body"), KEEP_ALIVE_BODIES, ids=KEEP_ALIVE_IDS)
@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5m", 300.0), ("1h30m", 5400.0), (90, 90.0), (2.5, 2.5), (0, 0.0), (-1, math.inf)],
)
def test_keep_alive_is_parsed_to_seconds(
    model: type[Any], body: dict[str, Any], value: Any, seconds: float
) -> None:
    # Through JSON bytes, as the HTTP handlers call it.
    req = parse(model, json.dumps({**body, "keep_alive": value}).encode())
    assert req.keep_alive == seconds


@pytest.mark.parametrize(("model", "body"), KEEP_ALIVE_BODIES, ids=KEEP_ALIVE_IDS)
def test_keep_alive_absent_or_null_is_none(model: type[Any], body: dict[str, Any]) -> None:
    assert parse(model, body).keep_alive is None
    assert parse(model, {**body, "keep_alive": None}).keep_alive is None
    assert parse(model, {**body, "keep_alive": "forever"}).keep_alive == math.inf


@pytest.mark.parametrize(("model", "body"), KEEP_ALIVE_BODIES, ids=KEEP_ALIVE_IDS)
@pytest.mark.parametrize("value", ["soon", "5x", "", True, [5], {"m": 5}], ids=repr)
def test_bad_keep_alive_names_the_param(model: type[Any], body: dict[str, Any], value: Any) -> None:
    error = refused(model, {**body, "keep_alive": value})
    assert error.param == "keep_alive"
    assert "'keep_alive'" in error.message


def test_model_action_fields_are_optional() -> None:
    action = parse(ModelAction, b"{}")
    assert action.model_id is None
    assert action.keep_alive is None


def test_model_action_with_model_and_keep_alive() -> None:
    action = parse(ModelAction, {"model_id": "thox-coder", "keep_alive": "10m", "extra": 1})
    assert action.model_id == "thox-coder"
    assert action.keep_alive == 600.0
    assert parse(ModelAction, {"keep_alive": -1}).keep_alive == math.inf


@pytest.mark.parametrize("model_id", ["", "x" * 257, 7, ["m"]], ids=lambda v: repr(v)[:12])
def test_model_action_bad_model_id(model_id: Any) -> None:
    assert refused(ModelAction, {"model_id": model_id}).param == "model_id"


def test_model_action_bad_keep_alive() -> None:
    assert refused(ModelAction, {"model_id": "m", "keep_alive": "soon"}).param == "keep_alive"


def test_model_action_accepts_a_256_character_id() -> None:
    assert parse(ModelAction, {"model_id": "x" * 256}).model_id == "x" * 256


TOOL = {"type": "function", "function": {"name": "f"}}


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
     ({"response_format": {"type": "json_schema"}}, "response_format"),
     ({"tool_choice": "required"}, "tool_choice"),  # without tools
     ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
      "tool_choice"),
     ({"tools": [TOOL], "response_format": {"type": "json_object"}}, "response_format"),
     ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id")],
)  # fmt: skip
def test_chat_fields_that_contradict_each_other_are_refused(
    fields: dict[str, Any], param: str
) -> None:
    req = parse(ChatRequest, chat(**fields))
    with pytest.raises(InvalidRequest) as info:
        req.check_supported()
    assert info.value.status == 400 and info.value.param == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"tools": [{"type": "function"}]}, "tools[0].function"),
     ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
      "tools[0].function.name"),
     ({"response_format": {"type": "xml"}}, "response_format.type"),
     ({"top_logprobs": 21, "logprobs": True}, "top_logprobs")],
)  # fmt: skip
def test_malformed_structured_fields_name_the_field(fields: dict[str, Any], param: str) -> None:
    assert refused(ChatRequest, chat(**fields)).param == param


@pytest.mark.parametrize(
    "fields",
    [{}, {"logprobs": False, "top_logprobs": 0}, {"logprobs": True, "top_logprobs": 20},
     {"response_format": {"type": "text"}}, {"response_format": {"type": "json_object"}},
     {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     {"tools": [], "tool_choice": "auto"}, {"tools": [TOOL], "tool_choice": "none"},
     {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
     {"messages": [{"role": "assistant", "content": None, "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}],
)  # fmt: skip
def test_chat_fields_that_parse(fields: dict[str, Any]) -> None:
    parse(ChatRequest, chat(**fields)).check_supported()


def test_completion_logprobs_and_echo_suffix_parse() -> None:
    body = {"model": "m", "prompt": "p", "logprobs": 0}
    assert parse(CompletionRequest, body).logprobs_wanted == 0
    with pytest.raises(UnsupportedParameter):
        parse(CompletionRequest, {**body, "echo": True}).check_supported()
    req = parse(CompletionRequest, {"model": "m", "prompt": "p", "echo": True, "suffix": "s"})
    req.check_supported()
    assert req.echo is True and req.suffix == "s"
    assert refused(CompletionRequest, {**body, "logprobs": 6}).param == "logprobs"


@pytest.mark.parametrize(("model", "body"), KEEP_ALIVE_BODIES, ids=KEEP_ALIVE_IDS)
@pytest.mark.parametrize("value", [10**400, -(10**400)], ids=["10**400", "-10**400"])
def test_keep_alive_no_float_holds_is_a_400(
    model: type[Any], body: dict[str, Any], value: int
) -> None:
    # Was an OverflowError: a 500 on every route that takes keep_alive.
    for data in (json.dumps({**body, "keep_alive": value}).encode(), {**body, "keep_alive": value}):
        error = refused(model, data)
        assert error.param == "keep_alive"
        assert "out of range" in error.message


def test_model_action_keep_alive_no_float_holds_is_a_400() -> None:
    error = refused(ModelAction, b'{"model_id": "m", "keep_alive": 1' + b"0" * 400 + b"}")
    assert error.param == "keep_alive"


@pytest.mark.parametrize(("model", "body"), KEEP_ALIVE_BODIES, ids=KEEP_ALIVE_IDS)
def test_long_keep_alive_text_is_refused_by_its_length(
    model: type[Any], body: dict[str, Any]
) -> None:
    error = refused(model, json.dumps({**body, "keep_alive": "1" * 100_000 + "x"}).encode())
    assert error.param == "keep_alive"
    assert error.message == (
        "Invalid value for 'keep_alive': a duration is at most 64 characters long, not 100001."
    )


# ---------------------------------------------------------------- token ids

MAX_ID = 2**31 - 1


@pytest.mark.parametrize(
    ("prompt", "where"),
    [([2**32], "[0]"), ([1, 2**64], "[1]"), ([-1], "[0]"), ([2**31], "[0]"),
     ([[1, 2], [3, 2**32]], "[1][1]"), ([[-5]], "[0][0]")],
    ids=["2**32", "2**64", "negative", "2**31", "nested", "nested-negative"],
)  # fmt: skip
def test_token_ids_out_of_range_are_refused(prompt: list[Any], where: str) -> None:
    # ids >= 2**32 wrapped around in ctypes and were served (200).
    for model, name in ((CompletionRequest, "prompt"), (EmbeddingRequest, "input")):
        error = refused(model, json.dumps({"model": "m", name: prompt}).encode())
        assert error.param == name
        assert f"{name}{where} is not one" in error.message
        assert f"from 0 to {MAX_ID}" in error.message


def test_token_ids_at_the_bounds_are_accepted() -> None:
    assert parse(CompletionRequest, {"model": "m", "prompt": [0, MAX_ID]}).prompt == [0, MAX_ID]
    req = parse(EmbeddingRequest, {"model": "m", "input": [[MAX_ID], [0]]})
    assert req.input == [[MAX_ID], [0]]


# ---------------------------------------------------------------- lone surrogates

# Raw JSON text: "\ud800" is a lone high surrogate, "\udc00" a lone low one.
SURROGATE_BODIES = [
    (ChatRequest, r'{"model": "m", "messages": [{"role": "user", "content": "a\ud800b"}]}',
     "messages[0].content"),
    (ChatRequest, r'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text",'
     r' "text": "\udc00"}]}]}', "messages[0].content[0].text"),
    (ChatRequest, r'{"model": "m\ud800", "messages": [{"role": "user", "content": "x"}]}',
     "model"),
    (ChatRequest, r'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop":'
     r' ["ok", "\ud800\ud800"]}', "stop[1]"),
    (CompletionRequest, r'{"model": "m", "prompt": ["fine", "\udfff"]}', "prompt[1]"),
    (CompletionRequest, r'{"model": "m", "prompt": "x", "user": "\ud800"}', "user"),
    (EmbeddingRequest, r'{"model": "m", "input": "\ud800"}', "input"),
    (ModelAction, r'{"model_id": "\ud800"}', "model_id"),
    (ModelAction, r'{"model_id": "m", "keep_alive": "5m\ud800"}', "keep_alive"),
    # Unknown fields are ignored, but their strings and keys are still text.
    (ChatRequest, r'{"model": "m", "messages": [{"role": "user", "content": "x"}], "foo":'
     r' {"bar": ["\ud800"]}}', "foo.bar[0]"),
    (ChatRequest, r'{"model": "m", "messages": [{"role": "user", "content": "x",'
     r' "k\ud800": 1}]}', "messages[0]"),
    (ChatRequest, r'{"model": "m", "messages": [{"role": "user", "content": "x"}],'
     r' "\ud800": 1}', None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("model", "text", "param"),
    SURROGATE_BODIES,
    ids=[f"{model.__name__}-{param}" for model, _, param in SURROGATE_BODIES],
)
def test_lone_surrogate_is_a_400_naming_where_it_is(
    model: type[Any], text: str, param: str | None
) -> None:
    # As bytes (REST) and as the object json.loads makes of them (the WebSocket): the same 400.
    for data in (text.encode(), json.loads(text)):
        error = refused(model, data)
        assert error.param == param
        assert "lone surrogate" in error.message
        assert error.type == "invalid_request_error"
        json.dumps(error.envelope(), ensure_ascii=False).encode()  # it can be sent


def test_surrogate_pair_is_text() -> None:
    body = r'{"model": "m", "messages": [{"role": "user", "content": "\ud83d\ude00"}]}'
    assert parse(ChatRequest, body.encode()).messages[0].content == "\U0001f600"
    assert parse(ChatRequest, json.loads(body)).messages[0].content == "\U0001f600"


def test_utf8_encoded_surrogate_is_a_400() -> None:
    # The three bytes UTF-8 would give a surrogate (CESU-8): not UTF-8 text either.
    body = b'{"model": "m", "input": "\xed\xa0\x80"}'
    assert "lone surrogate" in refused(EmbeddingRequest, body).message


def test_deeply_nested_surrogate_is_found() -> None:
    deep: Any = "\ud800"
    for _ in range(5000):  # deeper than Python's recursion limit
        deep = [deep]
    error = refused(ChatRequest, {"model": "m", "messages": [USER], "extra": deep})
    assert error.param == "extra" + "[0]" * 5000


def test_malformed_json_is_still_not_valid_json() -> None:
    for body in (b'{"model": "m", "input": "\\ud800', b'{"model": "m", "input": "x",}'):
        error = refused(EmbeddingRequest, body)
        assert (error.param, error.message) == (None, "The request body is not valid JSON.")


def test_null_means_not_given() -> None:
    """OpenAI's fields are nullable: clients that send every field send nulls."""
    req = parse(ChatRequest, chat(n=None, stream=None, presence_penalty=None, logprobs=None))
    assert (req.n, req.stream, req.presence_penalty, req.logprobs) == (1, False, 0.0, False)
    body = {"model": "m", "input": "x", "encoding_format": None, "dimensions": None}
    assert parse(EmbeddingRequest, body).encoding_format == "float"
    assert refused(ChatRequest, chat(model=None)).param == "model"  # a required one stays so


# -- the seed dialects' names on /v1: mapped, or refused by name, never dropped ------------------

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize("request_type", [ChatRequest, CompletionRequest])
def test_repetition_penalty_is_repeat_penalty(request_type: Any) -> None:
    body = {**CHAT, "prompt": "x", "repetition_penalty": 1.3}
    assert parse(request_type, body).repeat_penalty == 1.3
    with pytest.raises(UnsupportedParameter) as refused:
        parse(request_type, {**body, "repeat_penalty": 1.1})
    assert refused.value.param == "repetition_penalty"


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [("max_length", 5, "max_tokens"), ("model_id", "x", "'model'"),
     ("do_sample", False, "temperature")],
)  # fmt: skip
def test_other_generate_server_fields_are_refused_naming_ours(
    field: str, value: Any, hint: str
) -> None:
    with pytest.raises(UnsupportedParameter) as refused:
        parse(ChatRequest, {**CHAT, field: value})
    assert refused.value.param == field and hint in refused.value.message


def test_generate_server_fields_that_ask_nothing_pass() -> None:
    parse(ChatRequest, {**CHAT, "do_sample": True, "max_length": None, "model_id": None})
