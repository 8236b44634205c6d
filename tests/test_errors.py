"""thoxd/errors.py: every error becomes one OpenAI envelope with the right status."""

from __future__ import annotations

import pytest

import thoxd.errors
from thoxd.errors import (
    AmbiguousFraming,
    ContextLengthExceeded,
    EngineFailure,
    InsufficientMemory,
    InvalidHost,
    InvalidRequest,
    MemoryBusy,
    ModelBusy,
    ModelFileRejected,
    ModelNotFound,
    NotFound,
    OriginNotAllowed,
    PayloadTooLarge,
    QueueFull,
    ShuttingDown,
    ThoxdError,
    TooManyConnections,
    Unavailable,
    UnsupportedCapability,
    UnsupportedMediaType,
)


@pytest.mark.parametrize(
    ("error", "status", "type_", "code"),
    [
        (ThoxdError("boom"), 500, "server_error", "internal_error"),
        (InvalidRequest("bad", param="x"), 400, "invalid_request_error", "invalid_value"),
        (ContextLengthExceeded(10, 5), 400, "invalid_request_error", "context_length_exceeded"),
        (UnsupportedCapability("no"), 400, "invalid_request_error", "unsupported_capability"),
        (NotFound("gone"), 404, "invalid_request_error", "not_found"),
        (ModelNotFound("m"), 404, "invalid_request_error", "model_not_found"),
        (ModelBusy("serving"), 409, "invalid_request_error", "model_busy"),
        (PayloadTooLarge(1024), 413, "invalid_request_error", "payload_too_large"),
        (ModelFileRejected("m", "bad"), 422, "invalid_request_error", "model_file_rejected"),
        (InsufficientMemory("big"), 507, "server_error", "insufficient_memory"),
        (Unavailable("later"), 503, "server_error", "unavailable"),
        (QueueFull(3), 503, "server_error", "queue_full"),
        (MemoryBusy("held"), 503, "server_error", "memory_busy"),
        (ShuttingDown("bye"), 503, "server_error", "shutting_down"),
        (EngineFailure("oops"), 500, "server_error", "engine_error"),
        (InvalidHost("bad"), 400, "invalid_request_error", "invalid_host"),
        (AmbiguousFraming("both"), 400, "invalid_request_error", "ambiguous_framing"),
        (OriginNotAllowed("no"), 403, "invalid_request_error", "origin_not_allowed"),
        (UnsupportedMediaType("json"), 415, "invalid_request_error", "unsupported_media_type"),
        (TooManyConnections(4), 503, "server_error", "too_many_connections"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, ThoxdError) else None,
)
def test_status_type_and_code(error: ThoxdError, status: int, type_: str, code: str) -> None:
    assert error.status == status
    body = error.envelope()
    assert body["error"]["type"] == type_
    assert body["error"]["code"] == code


def test_envelope_has_the_openai_shape() -> None:
    body = InvalidRequest("temperature is out of range", param="temperature").envelope()
    assert body == {
        "error": {
            "message": "temperature is out of range",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "invalid_value",
            "status": 400,  # the Rax shape; OpenAI clients ignore it
        }
    }


def test_param_defaults_to_none_and_message_is_the_exception_text() -> None:
    error = EngineFailure("the engine stopped")
    assert error.envelope()["error"]["param"] is None
    assert str(error) == "the engine stopped"
    assert isinstance(error, Exception)


def test_context_length_exceeded_carries_token_counts() -> None:
    error = ContextLengthExceeded(n_prompt_tokens=9000, n_ctx=8192)
    assert isinstance(error, InvalidRequest)
    inner = error.envelope()["error"]
    assert inner["n_prompt_tokens"] == 9000
    assert inner["n_ctx"] == 8192
    assert inner["param"] == "messages"
    assert "8192" in inner["message"]
    assert "9000" in inner["message"]


def test_context_length_exceeded_param_can_name_the_prompt() -> None:
    error = ContextLengthExceeded(300, 256, param="prompt")
    assert error.envelope()["error"]["param"] == "prompt"


def test_queue_full_has_retry_after() -> None:
    error = QueueFull(waiting=16)
    assert error.headers == {"Retry-After": "1"}
    assert "16" in error.message


@pytest.mark.parametrize(("cls", "seconds"), [(MemoryBusy, "5"), (ShuttingDown, "5")])
def test_other_unavailable_errors_have_their_own_retry_after(
    cls: type[Unavailable], seconds: str
) -> None:
    assert cls("wait").headers == {"Retry-After": seconds}


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequest("x"),
        NotFound("x"),
        PayloadTooLarge(1),
        EngineFailure("x"),
        ThoxdError("x"),
        ModelBusy("x"),
        ModelFileRejected("m", "x"),
        InsufficientMemory("x"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_only_unavailable_errors_send_headers(error: ThoxdError) -> None:
    assert error.headers == {}


def test_model_not_found_names_the_model() -> None:
    error = ModelNotFound("llama-9000")
    inner = error.envelope()["error"]
    assert "'llama-9000'" in inner["message"]
    assert inner["param"] == "model"
    assert isinstance(error, NotFound)


def test_model_not_found_truncates_absurdly_long_names() -> None:
    name = "x" * 10_000
    message = ModelNotFound(name).message
    assert "x" * 64 + "..." in message
    assert "x" * 65 not in message
    assert len(message) < 200


def test_model_not_found_keeps_a_64_character_name_whole() -> None:
    name = "a" * 64
    message = ModelNotFound(name).message
    assert f"'{name}'" in message
    assert "..." not in message.split("GET")[0]


def test_payload_too_large_states_the_limit() -> None:
    assert "1048576 bytes" in PayloadTooLarge(1 << 20).message


def test_model_file_rejected_names_the_model_and_the_reason() -> None:
    error = ModelFileRejected("qwen-0.5b", "tensor 'x' data lies past the end of the file")
    inner = error.envelope()["error"]
    assert "'qwen-0.5b'" in inner["message"]
    assert "tensor 'x' data lies past the end of the file" in inner["message"]
    assert inner["param"] == "model"


def test_memory_busy_is_unavailable_and_the_507_is_not() -> None:
    # A 503 tells clients to retry; a model larger than the whole budget never fits.
    assert isinstance(MemoryBusy("x"), Unavailable)
    assert not isinstance(InsufficientMemory("x"), Unavailable)


def test_the_docstring_draws_every_error() -> None:
    """The tree in errors.py's docstring names each class with its status and its code."""
    doc = thoxd.errors.__doc__ or ""
    pending = [ThoxdError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__ != "thoxd.errors":
            continue
        [line] = [line for line in doc.splitlines() if f" {cls.__name__} " in f" {line} "]
        assert str(cls.status) in line, line
        # A family's line may give its type (server_error) rather than its code.
        assert cls.code in line or cls.type in line or cls is Unavailable, line


def test_refusals_that_leave_a_body_unread_close_the_connection() -> None:
    assert AmbiguousFraming("x").headers == {"Connection": "close"}
    assert TooManyConnections(4).headers == {"Retry-After": "1"}
    assert "4 connections" in TooManyConnections(4).message
