"""The four tools an IDE calls over MCP: thox_complete, thox_explain, thox_refactor, thox_test.

Each one is a request like any other: it goes through the same generation rules as the REST
routes (`thoxd.api.start`), shares the engine's slots and queue, and holds a slot only while it
generates. A call reports progress as tokens come (when the client sent a progressToken), and a
cancelled call (`notifications/cancelled`, or the client gone) frees its slot within one step.
What fails is a tool result with `isError` and a message the IDE can show; a full queue says
when to retry.

`thox_refactor` asks for its suggestions and rewritten code as JSON, enforced by a grammar (JSON
mode): valid output whatever the model, if not always wise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field
from starlette.requests import HTTPConnection

from thoxd.access import Caller, Limiter
from thoxd.api.schemas import ChatRequest, CompletionRequest, parse
from thoxd.api.start import Started, permit, start_chat, start_completion
from thoxd.engine import Delta, Engine, Failed, Finished
from thoxd.errors import ThoxdError
from thoxd.guards.access import caller_of
from thoxd.guards.shutdown import Shutdown

Text = Annotated[str, Field(max_length=200_000)]
Model = Annotated[
    str | None,
    Field(description="A model id or alias from thox://models; the device's default if omitted."),
]
MaxTokens = Annotated[int | None, Field(ge=1, le=8192, description="At most this many tokens.")]
Language = Annotated[str | None, Field(max_length=64, description="e.g. python, typescript, go.")]

_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)
# Progress is reported every this many pieces of text: a notification per token is chatty.
_PROGRESS_EVERY = 8


class Completion(BaseModel):
    completion: str = Field(description="The code that goes at the cursor.")
    model: str
    fill_in_the_middle: bool = Field(description="Whether the model's FIM tokens were used.")
    finish_reason: str


class Explanation(BaseModel):
    explanation: str
    model: str
    finish_reason: str


class Refactoring(BaseModel):
    suggestions: list[str] = Field(description="What to change, and why, one item each.")
    code: str = Field(description="The code rewritten with the suggestions applied.")
    model: str
    finish_reason: str


class Tests(BaseModel):
    tests: str = Field(description="The test code.")
    framework: str
    model: str
    finish_reason: str


def _refactor_schema(code: str) -> dict[str, Any]:
    """Bounded strings: a small model left free tends to write one string for ever."""
    return {
        "type": "object",
        "properties": {
            "suggestions": {
                "type": "array",
                "items": {"type": "string", "maxLength": 200},
                "minItems": 1,
                "maxItems": 4,
            },
            "code": {"type": "string", "maxLength": 2 * len(code) + 200},
        },
        "required": ["suggestions", "code"],
        "additionalProperties": False,
    }


class ThoxTools:
    def __init__(
        self,
        engine: Engine,
        default_model: str,
        shutdown: Shutdown,
        limiter: Limiter | None = None,
    ) -> None:
        self.engine = engine
        self.default_model = default_model
        self.shutdown = shutdown
        self.limiter = limiter  # each tool call counts against the caller's rate limits

    def all(self) -> list[tuple[Callable[..., Awaitable[BaseModel]], str, str]]:
        """Each tool: its function, name and the description an IDE shows."""
        return [
            (self.complete, "thox_complete",
             "Complete code at the cursor: give `code` (or `prefix` and `suffix`), the language,"
             " and optionally the file path and extra context. Uses fill-in-the-middle when the"
             " model has FIM tokens."),
            (self.explain, "thox_explain",
             "Explain a code snippet, or an error message and its stack trace (with the code"
             " that raised it, if you have it)."),
            (self.refactor, "thox_refactor",
             "Suggest refactorings for a piece of code: a list of suggestions and the rewritten"
             " code."),
            (self.test, "thox_test",
             "Write unit tests for a function or module, in the given framework (pytest,"
             " unittest, jest, go test...)."),
        ]  # fmt: skip

    # -- the tools -------------------------------------------------------------------------

    async def complete(
        self,
        ctx: Context,
        code: Annotated[str | None, Field(description="The code before the cursor.")] = None,
        prefix: Annotated[str | None, Field(description="Same as code.")] = None,
        suffix: Annotated[str | None, Field(description="The code after the cursor.")] = None,
        language: Language = None,
        path: Annotated[str | None, Field(max_length=1024)] = None,
        context: Annotated[str | None, Field(description="Other relevant code.")] = None,
        model: Model = None,
        max_tokens: MaxTokens = None,
    ) -> Completion:
        before = prefix if prefix is not None else code
        if not before and not suffix:
            raise ToolError("Give the code before the cursor as 'code' (or 'prefix').")
        name = model or self.default_model
        try:
            permit(self.engine, _caller(ctx), name)  # before the model is loaded for them
        except ThoxdError as exc:
            raise ToolError(_shown(exc)) from None
        async with self.engine.use(name) as loaded:
            fim = loaded.llama.fim is not None and bool(suffix)
        header = "".join(
            f"# {label}: {value}\n"
            for label, value in (("File", path), ("Language", language))
            if value
        )
        prompt = f"{header}{context}\n\n{before or ''}" if context else f"{header}{before or ''}"
        body: dict[str, Any] = {"model": name, "prompt": prompt, "max_tokens": max_tokens or 128}
        if fim:
            body["suffix"] = suffix
        else:
            body["stop"] = ["\n\n\n"]
        request = parse(CompletionRequest, body)
        text, reason = await self._run(
            ctx, lambda caller: start_completion(self.engine, request, caller), body["max_tokens"]
        )
        return Completion(completion=text, model=name, fill_in_the_middle=fim, finish_reason=reason)

    async def explain(
        self,
        ctx: Context,
        code: Annotated[str | None, Field(description="The code to explain.")] = None,
        error: Annotated[str | None, Field(description="An error message to explain.")] = None,
        stack_trace: Annotated[str | None, Field(description="Its stack trace.")] = None,
        language: Language = None,
        model: Model = None,
        max_tokens: MaxTokens = None,
    ) -> Explanation:
        if not code and not error:
            raise ToolError("Give 'code' to explain, or an 'error' (and its 'stack_trace').")
        parts = []
        if error:
            parts.append(f"Explain this error and how to fix it:\n{error}")
            if stack_trace:
                parts.append(f"Stack trace:\n{stack_trace}")
            if code:
                parts.append(f"The code:\n{_fenced(code, language)}")
        else:
            parts.append(f"Explain what this code does:\n{_fenced(code or '', language)}")
        text, reason, name = await self._chat(ctx, "\n\n".join(parts), model, max_tokens or 400)
        return Explanation(explanation=text.strip(), model=name, finish_reason=reason)

    async def refactor(
        self,
        ctx: Context,
        code: Annotated[str, Field(min_length=1, description="The code to refactor.")],
        language: Language = None,
        goal: Annotated[str | None, Field(description="e.g. readability, speed.")] = None,
        model: Model = None,
        max_tokens: MaxTokens = None,
    ) -> Refactoring:
        aim = f" Aim for {goal}." if goal else ""
        question = (
            f"Suggest refactorings for this code.{aim} Answer with JSON: 'suggestions', a list"
            " of short suggestions, and 'code', the code rewritten with them applied.\n\n"
            + _fenced(code, language)
        )
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": "refactoring", "schema": _refactor_schema(code)},
        }
        room = max_tokens or 400 + len(code)  # the rewritten code, and words about it
        text, reason, name = await self._chat(
            ctx, question, model, room, response_format=response_format
        )
        try:
            answer = json.loads(text)
        except ValueError:
            raise ToolError(
                "The model's answer was cut short before its JSON was complete; raise max_tokens."
            ) from None
        return Refactoring(
            suggestions=answer["suggestions"], code=answer["code"], model=name,
            finish_reason=reason,
        )  # fmt: skip

    async def test(
        self,
        ctx: Context,
        code: Annotated[str, Field(min_length=1, description="The function or module to test.")],
        framework: Annotated[str | None, Field(max_length=64)] = None,
        language: Language = None,
        model: Model = None,
        max_tokens: MaxTokens = None,
    ) -> Tests:
        framework = framework or _default_framework(language)
        question = (
            f"Write {framework} unit tests for this code. Reply with the test code only, in one"
            f" code block.\n\n{_fenced(code, language)}"
        )
        text, reason, name = await self._chat(ctx, question, model, max_tokens or 600)
        return Tests(tests=_code(text), framework=framework, model=name, finish_reason=reason)

    # -- running them -----------------------------------------------------------------------

    async def _chat(
        self,
        ctx: Context,
        question: str,
        model: str | None,
        max_tokens: int,
        response_format: dict[str, Any] | None = None,
    ) -> tuple[str, str, str]:
        name = model or self.default_model
        body: dict[str, Any] = {
            "model": name,
            "messages": [
                {"role": "system", "content": "You are a careful senior software engineer."},
                {"role": "user", "content": question},
            ],
            "max_tokens": max_tokens,
        }
        if response_format is not None:
            body["response_format"] = response_format
        request = parse(ChatRequest, body)
        text, reason = await self._run(
            ctx, lambda caller: start_chat(self.engine, request, caller), max_tokens
        )
        return text, reason, name

    async def _run(
        self, ctx: Context, start: Callable[[Caller | None], Awaitable[Started]], max_tokens: int
    ) -> tuple[str, str]:
        """Generate, reporting progress; a ThoxdError becomes a tool error the IDE shows.
        `start` is given the client (the HTTP request's), for the queue's fair share."""
        caller = _caller(ctx)
        try:
            if self.limiter is not None and caller is not None:
                await self.limiter.admit(caller)
            started = await start(caller)
        except ThoxdError as exc:
            raise ToolError(_shown(exc)) from None
        forget = self.shutdown.at_end(started.cancel)
        parts: list[str] = []
        try:
            async for event in started.generations[0].events():
                if isinstance(event, Delta):
                    parts.append(event.text)
                    if len(parts) % _PROGRESS_EVERY == 0:
                        await ctx.report_progress(len(parts), max_tokens, "generating")
                elif isinstance(event, Failed):
                    raise ToolError(_shown(event.error))
                elif isinstance(event, Finished):
                    if event.finish_reason == "cancelled":
                        raise ToolError("The call was cancelled: the device is shutting down.")
                    return "".join(parts), event.finish_reason
            raise ToolError("The generation ended without an answer.")
        finally:
            # Runs when the call is cancelled too: the slot is freed within one step.
            started.cancel()
            forget()


def _shown(error: ThoxdError) -> str:
    retry = error.headers.get("Retry-After")  # busy (503) or over a rate limit (429)
    return f"{error.message} Retry in {retry} s." if retry else error.message


def _fenced(code: str, language: str | None) -> str:
    return f"```{language or ''}\n{code}\n```"


def _code(text: str) -> str:
    """The first fenced code block of an answer, or the whole answer."""
    match = _FENCE.search(text)
    return (match.group(1) if match else text).strip() + "\n"


def _default_framework(language: str | None) -> str:
    frameworks = {"javascript": "jest", "typescript": "jest", "go": "go test", "rust": "cargo test"}
    return frameworks.get((language or "python").lower(), "pytest")


def _caller(ctx: Context) -> Caller | None:
    """Who called the tool: the HTTP request's caller (none over a transport without one)."""
    request = ctx.request_context.request
    return caller_of(request) if isinstance(request, HTTPConnection) else None
