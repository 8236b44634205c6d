"""What a chat request's tools, tool choice and response format become: the messages a chat
template renders, the grammar sampling must follow, and how the output is read back.

Two ways for tools, chosen by the model's chat template:

    its own format   a template that renders `tools` and writes calls in a known format (Hermes/
                     Qwen `<tool_call>`, Llama 3.x JSON, Mistral `[TOOL_CALLS]`) gets the tools and
                     the conversation's calls and results as it expects them. Hermes calls are
                     enforced by a grammar: from the model's first `<tool_call>` on (`auto`), or
                     from the start (`required`, a named function). Llama 3.x and Mistral calls
                     are enforced when required and read when the model chooses to make them.
    generic          any other template (the catalog's models): the tools are described in the
                     system prompt, and the whole answer is JSON the grammar enforces:
                     {"tool_calls": [{"name": ..., "arguments": {...}}]} or, when the model may
                     answer in words (`auto`), {"response": "..."}. Earlier calls and results go
                     back into the conversation in that same shape.

Every call's arguments are valid against its function's `parameters` by construction.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from thoxd.api.schemas import ChatMessage, ChatRequest, Tool
from thoxd.api.toolcalls import (
    HERMES,
    LLAMA3,
    MISTRAL,
    GenericOutput,
    Output,
    PlainOutput,
    TaggedOutput,
    Tags,
)
from thoxd.engine import GrammarSpec, UnsupportedSchema, json_grammar
from thoxd.errors import InvalidRequest

_GENERIC_INSTRUCTIONS = (
    "You can call tools. These are the tools, as JSON:\n{tools}\n\n"
    "{choice} Reply with one JSON object and nothing else: {shapes}."
)


@dataclass(frozen=True)
class ChatPlan:
    """How one chat request is rendered, constrained and read back."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None  # for a template that renders them itself
    grammar: GrammarSpec | None
    tags: Tags | None  # the model's own tool call format, when it is used
    generic: bool  # thoxd's generic tool format

    def output(self) -> Output:
        if self.generic:
            return GenericOutput()
        if self.tags is not None:
            return TaggedOutput(self.tags)
        return PlainOutput()


def plan_chat(body: ChatRequest, template_source: str | None) -> ChatPlan:
    if body.uses_tools:
        assert body.tools is not None
        tags = native_format(template_source)
        if tags is not None:
            return _native(body, body.tools, tags)
        return _generic(body, body.tools)
    grammar = response_grammar(body)
    return ChatPlan(_messages(body.messages, generic=False), None, grammar, None, False)


def response_grammar(body: Any) -> GrammarSpec | None:
    """JSON mode (`response_format`), on chat and text completions alike."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    schema: dict[str, Any] = {"type": "object"}  # json_object: any JSON object
    if fmt.type == "json_schema" and fmt.json_schema is not None:
        schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
    return GrammarSpec(_grammar(schema, "response_format"))


def native_format(template_source: str | None) -> Tags | None:
    """The tool call format a chat template renders tools for, if it is one thoxd reads."""
    if not template_source or "tools" not in template_source:
        return None
    if "<tool_call>" in template_source:
        return HERMES
    if "[TOOL_CALLS]" in template_source:
        return MISTRAL
    if "<|python_tag|>" in template_source or "ipython" in template_source:
        return LLAMA3
    return None


# -- the two ways --------------------------------------------------------------------------------


def _generic(body: ChatRequest, tools: list[Tool]) -> ChatPlan:
    chosen = _chosen(body, tools)
    calls = _calls_schema(chosen, body.parallel_tool_calls)
    may_answer = body.tool_choice in (None, "auto")
    shapes = '{"tool_calls": [{"name": "<tool name>", "arguments": {...}}]} to call tools'
    if may_answer:
        shapes += ', or {"response": "<your answer>"} to answer without a tool'
        schema: dict[str, Any] = {"anyOf": [calls, _RESPONSE]}
        choice = "Call a tool when it helps; otherwise answer in words."
    else:
        schema = calls
        names = ", ".join(t.function.name for t in chosen)
        choice = f"You must call {'the tool' if len(chosen) == 1 else 'one of the tools'} {names}."
    description = json.dumps([_describe(t) for t in tools], ensure_ascii=False)
    system = _GENERIC_INSTRUCTIONS.format(tools=description, choice=choice, shapes=shapes)
    messages = _with_system(_messages(body.messages, generic=True), system)
    grammar = GrammarSpec(_grammar(schema, "tools"))
    return ChatPlan(messages, None, grammar, None, True)


def _native(body: ChatRequest, tools: list[Tool], tags: Tags) -> ChatPlan:
    chosen = _chosen(body, tools)
    forced = body.tool_choice not in (None, "auto")
    grammar = None
    if tags is HERMES:
        call = _renamed(_grammar(_call_schema(chosen, "arguments"), "tools"), "call")
        repeat = ' ( "\\n"? "<tool_call>" "\\n"? call "\\n"? "</tool_call>" )*'
        root = 'root ::= "<tool_call>" "\\n"? call "\\n"? "</tool_call>"' + (
            repeat if body.parallel_tool_calls else ""
        )
        grammar = GrammarSpec(f"{root}\n{call}", () if forced else ("<tool_call>",))
    elif forced and tags is LLAMA3:
        grammar = GrammarSpec(_grammar(_call_schema(chosen, "parameters"), "tools"))
    elif forced and tags is MISTRAL:
        calls = _grammar(_array_schema(chosen, body.parallel_tool_calls), "tools")
        grammar = GrammarSpec('root ::= "[TOOL_CALLS]" calls\n' + _renamed(calls, "calls"))
    described = [{"type": "function", "function": _describe(t)} for t in tools]
    return ChatPlan(_messages(body.messages, generic=False), described, grammar, tags, False)


def _renamed(grammar: str, name: str) -> str:
    """A converted schema's grammar with its root rule renamed, to use inside another."""
    return re.sub(r"^root ::=", f"{name} ::=", grammar, flags=re.MULTILINE)


def _chosen(body: ChatRequest, tools: list[Tool]) -> list[Tool]:
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        return tools
    return [t for t in tools if t.function.name == choice.function.name]


_RESPONSE = {
    "type": "object",
    "properties": {"response": {"type": "string"}},
    "required": ["response"],
}


def _call_schema(tools: list[Tool], arguments: str) -> dict[str, Any]:
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, arguments: _parameters(t)},
            "required": ["name", arguments],
        }
        for t in tools
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _array_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    array: dict[str, Any] = {"type": "array", "items": _call_schema(tools, "arguments")}
    array["minItems"] = 1
    if not parallel:
        array["maxItems"] = 1
    return array


def _calls_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"tool_calls": _array_schema(tools, parallel)},
        "required": ["tool_calls"],
    }


def _parameters(tool: Tool) -> dict[str, Any]:
    # No parameters: a function of no arguments ({}), as OpenAI reads it.
    params = tool.function.parameters
    return params if params is not None else {"type": "object", "properties": {}}


def _describe(tool: Tool) -> dict[str, Any]:
    described: dict[str, Any] = {"name": tool.function.name}
    if tool.function.description:
        described["description"] = tool.function.description
    described["parameters"] = _parameters(tool)
    return described


def _grammar(schema: dict[str, Any], param: str) -> str:
    try:
        return json_grammar(schema)
    except UnsupportedSchema as exc:
        where = f" (at {exc.where})" if exc.where else ""
        raise InvalidRequest(
            f"This schema cannot be enforced: {exc}{where}. Remove it, or use JSON mode"
            " without a schema.",
            param=param,
        ) from None


# -- the conversation, for the template --------------------------------------------------------


def _messages(messages: list[ChatMessage], *, generic: bool) -> list[dict[str, Any]]:
    """The messages as templates read them ("developer" is OpenAI's new name for "system").
    Calls and results: in the model's own shape, or (generic) as the JSON it was asked for."""
    names = {c.id: c.function.name for m in messages for c in m.tool_calls or ()}
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if m.role == "assistant" and m.tool_calls:
            calls = [
                {"name": c.function.name, "arguments": _arguments(c.function.arguments)}
                for c in m.tool_calls
            ]
            if generic:
                out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls})})
            else:
                out.append(
                    {
                        "role": "assistant",
                        "content": m.text(),
                        "tool_calls": [
                            {"id": c.id, "type": "function", "function": call}
                            for c, call in zip(m.tool_calls, calls, strict=True)
                        ],
                    }
                )
        elif m.role == "tool":
            name = names.get(m.tool_call_id or "", m.name or "")
            if generic:
                result = {"tool_call_id": m.tool_call_id, "name": name, "content": m.text()}
                out.append({"role": "user", "content": json.dumps({"tool_response": result})})
            else:
                out.append(
                    {"role": "tool", "content": m.text(), "tool_call_id": m.tool_call_id,
                     "name": name}
                )  # fmt: skip
        else:
            out.append({"role": role, "content": m.text()})
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
