"""The self-hosted /generate server's routes (its docs, and its Python client `locallab-client`):
`POST /generate` and `POST /generate/batch`. Its `/chat` is thoxd/api/rox.py's (one route serves
both documents); its model and system routes are the ones in models.py and system.py, which
carry the fields that client reads.

    POST /generate        {prompt, model_id?, stream?, max_length?, temperature?, top_p?, top_k?,
                           repetition_penalty?, do_sample?, max_time?, system_prompt?}
                          -> {"response", "model", "usage": {prompt_tokens, completion_tokens,
                              total_tokens}}
                          stream: SSE whose `data:` is each piece's raw text (a piece of several
                          lines is several `data:` lines, as the SSE spec frames it), then
                          `data: [DONE]`; an error after the start is `data: Error: message`
    POST /generate/batch  {prompts: [...], same fields} -> {"responses": [...], "usage"}: the
                          prompts are one request, decoded side by side in the model's slots

The doc's defaults apply here: temperature 0.7, top_p 0.9, top_k 80, repetition_penalty 1.15,
sampling on (`do_sample: false` is greedy), max_length 8192 (the room left in the context at
most); `null` is the default, and `model_id: null` the default model. A prompt is the user's turn
for a model that chats (its chat template applies), text to continue for a completion model.
Errors are `{"detail": "message"}` (thoxd/api/dialects.py), a prompt too long for the context
413 as the doc says.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from thoxd.api.plain import collect, streamed
from thoxd.api.schemas import CompletionRequest, RequestBody, parse
from thoxd.api.start import Started, start_completion
from thoxd.engine import Engine
from thoxd.guards.access import caller_of
from thoxd.guards.shutdown import Shutdown

PATHS = ("/generate", "/generate/batch")
MAX_LENGTH = 8192  # the doc's default; the room left in the context caps it


class Quality(RequestBody):
    """The doc's "response quality parameters", shared by /generate, /generate/batch and the
    /generate server's /chat."""

    model_id: str | None = Field(None, min_length=1, max_length=256)
    max_length: int | None = Field(None, ge=1, le=1 << 20)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, ge=0.0, le=1.0)
    top_k: int = Field(80, ge=0, le=1000)
    repetition_penalty: float = Field(1.15, gt=0.0, le=10.0)
    do_sample: bool = True
    max_time: float | None = Field(None, gt=0.0, le=3600.0)  # locallab-client's: seconds

    def openai_fields(self, default_model: str) -> dict[str, Any]:
        """The same request in /v1's fields."""
        return {
            "model": self.model_id or default_model,
            "max_tokens": self.max_length or MAX_LENGTH,
            "temperature": self.temperature if self.do_sample else 0.0,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repeat_penalty": self.repetition_penalty,
        }


class Generate(Quality):
    prompt: str = Field(max_length=1 << 20)
    stream: bool = False


class GenerateBatch(Quality):
    prompts: list[str] = Field(min_length=1, max_length=64)


class LocalLabRoutes:
    def __init__(self, engine: Engine, default_model: str, shutdown: Shutdown) -> None:
        self.engine = engine
        self.default_model = default_model
        self.shutdown = shutdown

    def routes(self) -> list[Route]:
        return [
            Route("/generate", self.generate, methods=["POST"]),
            Route("/generate/batch", self.batch, methods=["POST"]),
        ]

    async def generate(self, request: Request) -> Response:
        body = parse(Generate, await request.body())
        started = await self._start(request, body, body.prompt)
        if body.stream:
            # An error after the start is `data: Error: message`: what locallab-client reads.
            return streamed(
                started, self.shutdown, body.max_time, sse_text, lambda m: sse_text(f"Error: {m}")
            )
        texts = await collect(request, started, self.shutdown, body.max_time)
        if texts is None:
            return Response(status_code=499)
        answer = {"response": texts.texts[0], "model": started.model.spec.id}
        return JSONResponse({**answer, "usage": texts.usage()})

    async def batch(self, request: Request) -> Response:
        body = parse(GenerateBatch, await request.body())
        started = await self._start(request, body, body.prompts)
        texts = await collect(request, started, self.shutdown, body.max_time)
        if texts is None:
            return Response(status_code=499)
        return JSONResponse({"responses": texts.texts, "usage": texts.usage()})

    async def _start(self, request: Request, body: Quality, prompt: str | list[str]) -> Started:
        completion = parse(
            CompletionRequest, {**body.openai_fields(self.default_model), "prompt": prompt}
        )
        return await start_completion(self.engine, completion, caller_of(request), turns=True)


def sse_text(text: str) -> str:
    """One SSE event whose data is `text`: a `data:` line per line, as the spec frames it (a
    reader joins them with newlines; the one space after the colon is the framing's)."""
    return "".join(f"data: {line}\n" for line in text.split("\n")) + "\n"


def render_error(error: dict[str, Any]) -> tuple[int, Any]:
    """The OpenAI envelope's error in this document's shape: `{"detail": "message"}`, with its
    status codes (a prompt too long for the context is its 413, "Input too long")."""
    status = int(error.get("status", 500))
    if error.get("code") == "context_length_exceeded":
        status = 413
    elif status >= 500 and status != 503:
        status = 500
    return status, {"detail": error.get("message", "Internal server error.")}
