"""`POST /chat`, which two seed documents define (the Rox docs and the self-hosted /generate
server's), and Rox's `POST /hf/generate`. Rox's per-model routes (/turbo, /coder, ...) name its
hosted models and are not built: `model_id` picks a model here.

    POST /chat         {messages, temperature?, top_p?, max_tokens?, stream?}           (Rox)
                       + {model_id?, max_length?, top_k?, repetition_penalty?, do_sample?,
                          max_time?}                                 (the /generate server)
                       -> {"content", "choices": [{"index", "message", "finish_reason"}],
                           "model", "usage"}: both documents' fields in one answer
                       stream: `data: {"content": "..."}` events, then `data: [DONE]`
    POST /hf/generate  {inputs, parameters?: {temperature, top_p, max_new_tokens, top_k,
                        repetition_penalty, do_sample}} -> [{"generated_text"}]

Defaults are the /generate server's (its docs name them; Rox's agree on temperature). A missing
or invalid field is 422 `{"detail": [{"loc": ["body", ...], "msg", "type"}]}` as Rox (and
FastAPI) answer it; other errors `{"detail": "message"}` (thoxd/api/dialects.py).
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from thoxd.api.locallab import Quality
from thoxd.api.plain import collect, finish_reason, streamed
from thoxd.api.schemas import Body, ChatRequest, CompletionRequest, parse
from thoxd.api.serving import sse_data
from thoxd.api.start import start_chat, start_completion
from thoxd.engine import Engine
from thoxd.guards.access import caller_of
from thoxd.guards.shutdown import Shutdown

PATHS = ("/chat", "/hf/generate")


class Message(Body):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1 << 20)


class ChatBody(Quality):
    messages: list[Message] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)  # Rox's name for max_length
    stream: bool = False


class HfParameters(Body):
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    max_new_tokens: int = Field(8192, ge=1, le=1 << 20)
    top_k: int | None = Field(None, ge=0, le=1000)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    do_sample: bool = True


class HfGenerate(Body):
    inputs: str = Field(max_length=1 << 20)
    parameters: HfParameters = Field(default_factory=HfParameters)


class RoxRoutes:
    def __init__(self, engine: Engine, default_model: str, shutdown: Shutdown) -> None:
        self.engine = engine
        self.default_model = default_model
        self.shutdown = shutdown

    def routes(self) -> list[Route]:
        return [
            Route("/chat", self.chat, methods=["POST"]),
            Route("/hf/generate", self.hf_generate, methods=["POST"]),
        ]

    async def chat(self, request: Request) -> Response:
        body = _validated(ChatBody, await request.body())
        if isinstance(body, Response):
            return body
        fields = body.openai_fields(self.default_model)
        if body.max_tokens is not None:
            fields["max_tokens"] = body.max_tokens
        messages = [m.model_dump() for m in body.messages]
        chat = parse(ChatRequest, {**fields, "messages": messages})
        started = await start_chat(self.engine, chat, caller_of(request))
        if body.stream:
            return streamed(
                started,
                self.shutdown,
                body.max_time,
                lambda text: sse_data({"content": text}),
                lambda message: sse_data({"detail": message}),
            )
        texts = await collect(request, started, self.shutdown, body.max_time)
        if texts is None:
            return Response(status_code=499)
        [text], [finished] = texts.texts, texts.finished
        message = {"role": "assistant", "content": text}
        return JSONResponse(
            {
                "content": text,  # Rox
                "choices": [  # the /generate server
                    {"index": 0, "message": message, "finish_reason": finish_reason(finished)}
                ],
                "model": started.model.spec.id,
                "usage": texts.usage(),
            }
        )

    async def hf_generate(self, request: Request) -> Response:
        body = _validated(HfGenerate, await request.body())
        if isinstance(body, Response):
            return body
        p = body.parameters
        fields: dict[str, Any] = {
            "model": self.default_model,
            "prompt": body.inputs,
            "max_tokens": p.max_new_tokens,
            "temperature": p.temperature if p.do_sample else 0.0,
            "top_p": p.top_p,
        }
        if p.top_k is not None:
            fields["top_k"] = p.top_k
        if p.repetition_penalty is not None:
            fields["repeat_penalty"] = p.repetition_penalty
        completion = parse(CompletionRequest, fields)
        # Single-turn: the input is a user's turn for a model that chats.
        started = await start_completion(self.engine, completion, caller_of(request), turns=True)
        texts = await collect(request, started, self.shutdown)
        if texts is None:
            return Response(status_code=499)
        return JSONResponse([{"generated_text": texts.texts[0]}])


M = TypeVar("M", bound=BaseModel)


def _validated(model: type[M], raw: bytes) -> M | Response:
    """The body, or Rox's (FastAPI's) 422 listing what is missing or invalid."""
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        return JSONResponse({"detail": validation_detail(exc)}, status_code=422)


def validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    detail: list[dict[str, Any]] = []
    for error in exc.errors(include_url=False, include_input=False)[:16]:
        kind = error["type"]
        loc: list[str | int] = ["body"]
        if kind == "json_invalid":
            detail.append(
                {"loc": loc, "msg": "JSON decode error", "type": "value_error.jsondecode"}
            )
            continue
        missing = kind == "missing"
        detail.append(
            {
                "loc": [*loc, *error["loc"]],
                "msg": "field required" if missing else error["msg"],
                "type": "value_error.missing" if missing else kind,
            }
        )
    return detail


def render_error(error: dict[str, Any]) -> tuple[int, Any]:
    """An error from the shared rules in Rox's shapes: a bad value (400) is its 422 with the
    field's place; the rest `{"detail": "message"}`, server errors as its 500."""
    status = int(error.get("status", 500))
    message = error.get("message", "Internal server error.")
    if status == 400:
        param = error.get("param")
        loc: list[str | int] = ["body"]
        if isinstance(param, str):
            for part in param.replace("[", ".").replace("]", "").split("."):
                loc.append(int(part) if part.isdigit() else part)
        return 422, {"detail": [{"loc": loc, "msg": message, "type": "value_error"}]}
    if status >= 500 and status != 503:
        status = 500
    return status, {"detail": message}
