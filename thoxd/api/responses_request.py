"""The body of `POST /v1/responses`, and the chat request it becomes.

A Responses request runs as the ChatRequest chat completions take (`chat_request`), so it follows
the same rules: the model's chat template, tools by grammar, JSON mode, the context check.
Errors found on the way are renamed into this API's own fields (`input`, `text.format`,
`max_output_tokens`, `tools[i].name`), so they point at what the client sent.

What the API defines and thoxd does not do is refused by name (thoxd.api.unsupported): background
runs, reasoning, built-in tools (web search, file search, ...), `truncation: "auto"`, `include`,
log probabilities, stored prompts, conversations.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from thoxd.api import unsupported
from thoxd.api.responses_items import InputItem
from thoxd.api.schemas import MAX_TOKENS_BOUND, Body, ChatRequest, parse
from thoxd.catalog.entries import SamplingDefaults
from thoxd.errors import InvalidRequest, UnsupportedParameter

RESPONSES: unsupported.Table = {
    "background": ((None, False), "background responses: each answer comes on its request"),
    "background_options": ((None,), "background responses"),
    "conversation": ((None,), "conversation objects; send 'previous_response_id' instead"),
    "context_management": ((None, []), "context management (compaction)"),
    "include": ((None, []), "'include': no reasoning, search results or log probabilities here"),
    "max_tool_calls": ((None,), "'max_tool_calls'; 'parallel_tool_calls': false allows one call"),
    "moderation": ((None,), "moderation"),
    "prompt": ((None,), "stored prompts"),
    "prompt_cache_options": ((None,), "prompt cache options (the prefix cache is automatic)"),
    "prompt_cache_retention": ((None, "in_memory"), "keeping prompt caches beyond memory"),
    "service_tier": ((None, "auto", "default"), "service tiers (every request runs alike)"),
    "top_logprobs": ((None, 0), "log probabilities here (chat completions give them)"),
    "truncation": ((None, "disabled"), "dropping the start of a conversation that does not fit"),
    "image": ((None,), "image options (no model here makes images)"),
    "access_programs": ((None,), "access programs"),
}
# thoxd's own sampling fields, as chat completions take them: checked there, by the same names.
EXTENSIONS = (
    "top_k",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "keep_alive",
)
_NAME = r"^[A-Za-z0-9_-]+$"


class FunctionTool(Body):
    """A tool in the Responses shape (flat: `name` beside `type`). Only functions are served."""

    type: str = Field(max_length=64)
    name: str | None = Field(None, min_length=1, max_length=64, pattern=_NAME)
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    # Defined by the API for features thoxd lacks: refused when they ask for something.
    defer_loading: bool | None = None
    async_: bool | None = Field(None, alias="async")
    allowed_callers: list[str] | None = None
    output_schema: dict[str, Any] | None = None


class ToolChoiceObject(Body):
    type: str = Field(max_length=64)
    name: str | None = Field(None, min_length=1, max_length=64)


class TextFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str = Field("response", min_length=1, max_length=64, pattern=_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(Body):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class StreamOptions(Body):
    include_obfuscation: bool = False


Metadata = dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]]


class ResponsesRequest(Body):
    model: str = Field(min_length=1, max_length=256)
    input: list[InputItem] | None = Field(None, max_length=4096)
    instructions: str | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=256)
    store: bool | None = None  # None: true, as OpenAI
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_BOUND)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: dict[str, Any] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    metadata: Metadata | None = None
    user: str | None = Field(None, max_length=512)
    safety_identifier: str | None = Field(None, max_length=512)
    prompt_cache_key: str | None = Field(None, max_length=512)
    top_k: Any = None
    min_p: Any = None
    repeat_penalty: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    seed: Any = None
    stop: Any = None
    keep_alive: Any = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        unsupported.refuse(data, RESPONSES)
        return data

    @field_validator("input", mode="before")
    @classmethod
    def _one_message(cls, value: Any) -> Any:
        # A string is one user message.
        return [{"role": "user", "content": value}] if isinstance(value, str) else value

    @field_validator("metadata")
    @classmethod
    def _at_most_16(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and len(value) > 16:
            raise ValueError("at most 16 keys")
        return value

    @property
    def stored(self) -> bool:
        return self.store is not False

    def check_supported(self) -> None:
        for key, value in (self.reasoning or {}).items():
            if value is not None and not (key == "effort" and value == "none"):
                raise UnsupportedParameter(
                    "Reasoning is not supported: no model here reasons apart from its answer.",
                    param=f"reasoning.{key}",
                )
        if self.text is not None and self.text.verbosity not in (None, "medium"):
            raise UnsupportedParameter(
                "A verbosity setting is not supported.", param="text.verbosity"
            )
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type == "json_schema" and fmt.schema_ is None:
            raise InvalidRequest(
                "A 'json_schema' format needs its 'schema'.", param="text.format.schema"
            )
        for i, tool in enumerate(self.tools or ()):
            _check_tool(tool, f"tools[{i}]")
        choice = self.tool_choice
        if isinstance(choice, ToolChoiceObject):
            if choice.type != "function":
                raise UnsupportedParameter(
                    f"tool_choice of type '{choice.type}' is not supported: choose 'none',"
                    " 'auto', 'required' or a function.",
                    param="tool_choice",
                )
            if choice.name is None:
                raise InvalidRequest("tool_choice names no function.", param="tool_choice.name")

    def chat_request(self, messages: list[dict[str, Any]]) -> ChatRequest:
        """The chat request that runs this one, over `messages` (the whole conversation)."""
        if self.instructions is not None:  # of this request only: never carried over
            messages = [{"role": "system", "content": self.instructions}, *messages]
        if not messages:
            raise InvalidRequest("Give 'input' (or 'instructions').", param="input")
        data: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "user": self.user,
            "parallel_tool_calls": self.parallel_tool_calls,
            "response_format": _response_format(self.text),
            "tools": [_chat_tool(tool) for tool in self.tools] if self.tools else None,
            "tool_choice": (
                {"type": "function", "function": {"name": self.tool_choice.name}}
                if isinstance(self.tool_choice, ToolChoiceObject)
                else self.tool_choice
            ),
            **{name: getattr(self, name) for name in EXTENSIONS},
        }
        with renamed_params():
            body = parse(ChatRequest, {k: v for k, v in data.items() if v is not None})
            body.check_supported()
        return body

    def settings(self, defaults: SamplingDefaults) -> dict[str, Any]:
        """The request's settings as a response echoes them (sampling as it ran)."""
        fmt = self.text.format if self.text is not None else None
        choice = self.tool_choice or "auto"
        return {
            "background": False,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": None,
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "previous_response_id": self.previous_response_id,
            "prompt_cache_key": self.prompt_cache_key,
            "reasoning": {"effort": None, "summary": None},
            "safety_identifier": self.safety_identifier,
            "service_tier": "default",
            "store": self.stored,
            "temperature": defaults.temperature if self.temperature is None else self.temperature,
            "text": {"format": _echo_format(fmt), "verbosity": "medium"},
            "tool_choice": choice.model_dump(exclude_none=True)
            if isinstance(choice, ToolChoiceObject)
            else choice,
            "tools": [_echo_tool(tool) for tool in self.tools or ()],
            "top_logprobs": 0,
            "top_p": defaults.top_p if self.top_p is None else self.top_p,
            "truncation": "disabled",
            "user": self.user,
            "metadata": self.metadata or {},
        }


def _check_tool(tool: FunctionTool, where: str) -> None:
    if tool.type != "function":
        raise UnsupportedParameter(
            f"Tools of type '{tool.type}' are not supported: the device answers from its models"
            " only, with the 'function' tools the client runs.",
            param=where,
        )
    if tool.name is None:
        raise InvalidRequest("A function tool needs a 'name'.", param=f"{where}.name")
    asks = {
        "defer_loading": tool.defer_loading,
        "async": tool.async_,
        "output_schema": tool.output_schema is not None,
        "allowed_callers": tool.allowed_callers not in (None, ["direct"]),
    }
    for name, asked in asks.items():
        if asked:
            raise UnsupportedParameter(
                f"'{name}' on a function tool is not supported.", param=f"{where}.{name}"
            )


def _chat_tool(tool: FunctionTool) -> dict[str, Any]:
    function = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
    return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


def _echo_tool(tool: FunctionTool) -> dict[str, Any]:
    return {
        "type": "function",
        "name": tool.name,
        "description": tool.description,
        "parameters": tool.parameters,
        # Calls are held to `parameters` by a grammar, strict or not: what strict promises.
        "strict": True if tool.strict is None else tool.strict,
    }


def _echo_format(fmt: TextFormat | None) -> dict[str, Any]:
    if fmt is None or fmt.type != "json_schema":
        return {"type": fmt.type if fmt is not None else "text"}
    return fmt.model_dump(by_alias=True, exclude_none=True)


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type != "json_schema":
        return None if fmt is None else {"type": fmt.type}
    schema = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}
    kept = {k: v for k, v in schema.items() if v is not None}
    return {"type": "json_schema", "json_schema": kept}


# -- chat's field names, as this API names them --------------------------------------------------

_RENAMES = (
    (re.compile(r"^messages(\[\d+\])?(\..*)?$"), "input"),
    (re.compile(r"^response_format(\..*)?$"), "text.format"),
    (re.compile(r"^max_tokens$"), "max_output_tokens"),
    (re.compile(r"^(tools\[\d+\])\.function(\..*)?$"), r"\1\2"),
    (re.compile(r"^tool_choice\.function(\..*)?$"), r"tool_choice\1"),
)


def responses_param(param: str | None) -> str | None:
    if param is None:
        return None
    for pattern, replacement in _RENAMES:
        if pattern.match(param):
            return pattern.sub(replacement, param)
    return param


@contextlib.contextmanager
def renamed_params() -> Iterator[None]:
    """Re-raise an InvalidRequest from the chat rules with this API's name for its param."""
    try:
        yield
    except InvalidRequest as error:
        old, new = error.param, responses_param(error.param)
        if new != old:
            error.param = new
            error.message = error.message.replace(f"'{old}'", f"'{new}'")
            error.args = (error.message,)
        raise
