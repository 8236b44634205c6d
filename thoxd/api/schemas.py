"""Request bodies, validated once for every surface (REST and WebSocket).

Unknown fields are ignored, as OpenAI's own server does; wrong types and out-of-range values are
refused with a 400 that names the offending `param`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from thoxd.api import unsupported
from thoxd.api.surrogates import lone_surrogate, surrogate_in_json
from thoxd.catalog.entries import Duration
from thoxd.errors import InvalidRequest, UnsupportedParameter

_Model = TypeVar("_Model", bound=BaseModel)

# Large enough that "as many as fit" is always expressible; the context bounds it in practice.
MAX_TOKENS_BOUND = 1 << 31
MAX_LOGIT_BIAS = 1024  # tokens one request may bias
StopString = Annotated[str, Field(min_length=1, max_length=512)]


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class TextPart(Body):
    type: Literal["text"]
    text: str


class FunctionCall(Body):
    name: str = Field(min_length=1, max_length=256)
    arguments: str = Field(max_length=1 << 20)  # JSON text, as the model wrote it


class ToolCall(Body):
    """A tool call an assistant message made (sent back in the conversation)."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(Body):
    include_usage: bool = False


class RequestBody(Body):
    """A whole request body. OpenAI's fields are nullable: `"n": null` (some clients send every
    field) means "not given", so it gets the default instead of a 400."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class GenerationBody(RequestBody):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_BOUND)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_BOUND)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1000)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    stop: StopString | list[StopString] | None = None
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)
    n: int = Field(1, ge=1, le=128)  # and at most the model's slots (start.py)
    # Token id (as a JSON key) -> bias added to its logit; -100 bans it. Ids are checked
    # against the model's vocabulary in start.py.
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    # An extension (Ollama's): how long the model stays loaded once idle after this request.
    keep_alive: Duration | None = None
    user: str | None = Field(None, max_length=512)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _foreign_fields(cls, data: Any) -> Any:
        return unsupported.foreign_fields(data)

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def check_supported(self) -> None:
        """Raise UnsupportedParameter for a field whose promise about the output we cannot keep."""

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens")
        for key in value:
            if not (key.isascii() and key.isdigit() and int(key) <= MAX_TOKEN_ID):
                raise ValueError(
                    f"its keys are token ids (integers from 0), and {key!r} is not one"
                )
        return value

    @property
    def bias(self) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as (token id, bias) pairs."""
        return tuple((int(k), v) for k, v in (self.logit_bias or {}).items())

    @property
    def logprobs_wanted(self) -> int | None:
        """Report each token's log probability and this many alternatives (None: not asked)."""
        return None

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class JsonSchema(Body):
    name: str = Field("response", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
    """`json_object`: any JSON object; `json_schema`: a document valid against the schema. Both
    are enforced by a grammar while sampling (thoxd/engine/schema.py)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class FunctionDef(Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDef


class ChosenFunction(Body):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(Body):
    type: Literal["function"]
    function: ChosenFunction


class ChatRequest(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        unsupported.refuse(data, unsupported.CHAT)
        return data

    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def check_supported(self) -> None:
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            raise InvalidRequest(
                "response_format 'json_schema' needs its 'json_schema' object.",
                param="response_format",
            )
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise InvalidRequest("'tool_choice' needs 'tools'.", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            names = {t.function.name for t in self.tools}
            if self.tool_choice.function.name not in names:
                raise InvalidRequest(
                    f"tool_choice names '{self.tool_choice.function.name}', which is not one of"
                    " the tools.",
                    param="tool_choice",
                )
        if self.tools and self.uses_tools and fmt is not None and fmt.type != "text":
            raise InvalidRequest(
                "Send 'tools' or a JSON 'response_format', not both: tool calls are JSON already.",
                param="response_format",
            )
        for i, message in enumerate(self.messages):
            if message.role == "tool" and not message.tool_call_id:
                raise InvalidRequest(
                    "A 'tool' message needs the 'tool_call_id' it answers.",
                    param=f"messages[{i}].tool_call_id",
                )

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# Token ids are range-checked once the union has matched (_prompt), in one clear message.
TokenList = Annotated[list[int], Field(min_length=1)]
PromptInput = str | list[str] | TokenList | list[TokenList]
# llama.cpp's llama_token is an int32: a larger id would wrap around on its way in.
MAX_TOKEN_ID = (1 << 31) - 1


def _prompt(name: str, most: int) -> AfterValidator:
    """A prompt/input list holds 1..`most` items (a flat token list counts as one), and its
    token ids lie in 0..MAX_TOKEN_ID."""

    def check(value: PromptInput) -> PromptInput:
        if isinstance(value, str):
            return value
        several = not (value and isinstance(value[0], int))
        if several and not 1 <= len(value) <= most:
            raise ValueError(f"give between 1 and {most} items")
        lists = [value] if not several else [v for v in value if isinstance(v, list)]
        for i, tokens in enumerate(lists):
            where = f"{name}[{i}]" if several else name
            for j, token in enumerate(tokens):
                if isinstance(token, int) and not 0 <= token <= MAX_TOKEN_ID:
                    raise ValueError(
                        f"token ids are integers from 0 to {MAX_TOKEN_ID}, and {where}[{j}]"
                        " is not one"
                    )
        return value

    return AfterValidator(check)


class CompletionRequest(GenerationBody):
    prompt: Annotated[PromptInput, _prompt("prompt", 64)]

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        unsupported.refuse(data, unsupported.COMPLETIONS)
        return data

    # Fill-in-the-middle: the text that follows the completion (models with FIM tokens only).
    suffix: str | None = None
    echo: bool = False  # the prompt's text comes first in each choice's text
    logprobs: int | None = Field(None, ge=0, le=5)
    response_format: ResponseFormat | None = None

    def check_supported(self) -> None:
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            raise InvalidRequest(
                "response_format 'json_schema' needs its 'json_schema' object.",
                param="response_format",
            )
        if self.echo and self.logprobs is not None:
            raise UnsupportedParameter(
                "'logprobs' with 'echo' (the prompt's own log probabilities) is not supported.",
                param="logprobs",
            )

    @property
    def logprobs_wanted(self) -> int | None:
        return self.logprobs


class EmbeddingRequest(RequestBody):
    model: str = Field(min_length=1, max_length=256)

    input: Annotated[PromptInput, _prompt("input", 2048)]
    encoding_format: Literal["float", "base64"] = "float"
    # Shortened vectors: no model here was trained for them, so only the full size is served.
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=512)
    keep_alive: Duration | None = None


class ModelAction(Body):
    """POST /models/load and /models/unload."""

    model_id: str | None = Field(None, min_length=1, max_length=256)
    keep_alive: Duration | None = None


def parse(model: type[_Model], data: bytes | dict[str, Any]) -> _Model:
    """Validate a JSON body (bytes) or an already-decoded object into `model`."""
    try:
        if isinstance(data, bytes | bytearray):
            return model.model_validate_json(data)
        if (where := lone_surrogate(data)) is not None:
            raise _surrogate_error(where)
        return model.model_validate(data)
    except ValidationError as exc:
        raise _as_invalid_request(exc, data) from None


def _as_invalid_request(exc: ValidationError, data: bytes | dict[str, Any]) -> InvalidRequest:
    error = exc.errors(include_url=False, include_input=False)[0]
    if error["type"] == "json_invalid":
        where = surrogate_in_json(data) if isinstance(data, bytes | bytearray) else None
        if where is not None:
            return _surrogate_error(where)
        return InvalidRequest("The request body is not valid JSON.", param=None)
    if error["type"] == "model_type" and not error["loc"]:
        return InvalidRequest("The request body must be a JSON object.", param=None)
    param = _param_name(error["loc"])
    # A validator's own words, without pydantic's "Value error, " in front of them.
    reason = error.get("ctx", {}).get("error", error["msg"])
    return InvalidRequest(f"Invalid value for '{param}': {reason}.", param=param)


def _surrogate_error(loc: tuple[int | str, ...]) -> InvalidRequest:
    why = "a lone surrogate (a \\ud800-\\udfff escape without its pair), which is not Unicode text"
    if not loc:
        return InvalidRequest(f"The request body holds {why}.", param=None)
    param = _param_name(loc)
    return InvalidRequest(f"Invalid value for '{param}': it holds {why}.", param=param)


_UNION_TAGS = {"str", "int"}
_VALIDATOR_TAGS = ("function-", "constrained-")


def _param_name(loc: tuple[int | str, ...]) -> str:
    # Pydantic adds the union member's type name to `loc` ('prompt', 'str'); drop those.
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif "[" in part or part in _UNION_TAGS or part.startswith(_VALIDATOR_TAGS):
            continue
        else:
            name += f".{part}" if name else part
    return name or "body"
