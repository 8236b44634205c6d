"""Every error thoxd reports, and the one OpenAI envelope they all turn into.

    ThoxdError                      500 server_error
    ├── InvalidRequest              400 invalid_request_error   (names `param`)
    │   ├── ContextLengthExceeded   400 context_length_exceeded (n_prompt_tokens, n_ctx)
    │   ├── UnsupportedCapability   400 unsupported_capability  (chat on an embedding model, ...)
    │   ├── UnsupportedParameter    400 unsupported_parameter   (a field this model cannot honour)
    │   ├── InvalidHost             400 invalid_host            (no Host, or not a host[:port])
    │   ├── PreviousResponseNotFound 400 previous_response_not_found (not stored, evicted)
    │   └── AmbiguousFraming        400 ambiguous_framing       (Transfer-Encoding + Content-Length)
    ├── NotFound                    404 not_found
    │   ├── ModelNotFound           404 model_not_found
    │   └── ResponseNotFound        404 response_not_found      (GET /v1/responses/{id})
    ├── InvalidApiKey               401 invalid_api_key         (keys on: missing, wrong, revoked)
    ├── Forbidden                   403 forbidden               (a client key on an owner route)
    │   ├── HostNotAllowed          403 host_not_allowed        (DNS rebinding)
    │   ├── ClientNotAllowed        403 client_not_allowed      (not a LAN address)
    │   └── OriginNotAllowed        403 origin_not_allowed      (a cross-site browser request)
    ├── RequestTimeout              408 request_timeout         (slow client)
    ├── ModelBusy                   409 model_busy              (unload while serving)
    ├── RateLimitExceeded           429 rate_limit_exceeded     (with Retry-After)
    ├── PayloadTooLarge             413 payload_too_large
    ├── UnsupportedMediaType        415 unsupported_media_type  (a body that is not JSON)
    ├── ModelFileRejected           422 model_file_rejected     (GGUF gate, sha256, missing)
    ├── InsufficientMemory          507 insufficient_memory     (larger than the budget)
    ├── Unavailable                 503 (with Retry-After)
    │   ├── QueueFull               503 queue_full
    │   ├── MemoryBusy              503 memory_busy             (room held by busy models)
    │   ├── ShuttingDown            503 shutting_down
    │   └── TooManyConnections      503 too_many_connections    (max_connections reached)
    ├── PeerUnavailable             502 peer_unavailable        (a fleet peer stopped answering)
    └── EngineFailure               500 engine_error

Every envelope carries the HTTP `status` too (the Rax docs' shape, which OpenAI clients ignore).
Messages are written for the person reading them: they never carry absolute paths, tracebacks,
exception text from libraries, or key material. HTTP handlers and the WebSocket endpoint both call
`envelope()`, so an error has the same shape wherever it surfaces.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ThoxdError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.extra = extra

    @property
    def headers(self) -> dict[str, str]:
        return {}

    def envelope(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
                "status": self.status,
                **self.extra,
            }
        }


class InvalidRequest(ThoxdError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"

    def __init__(self, n_prompt_tokens: int, n_ctx: int, *, param: str = "messages") -> None:
        super().__init__(
            f"This model's maximum context length is {n_ctx} tokens, but the prompt has "
            f"{n_prompt_tokens} tokens (and at least one more is needed to generate). "
            "Shorten the prompt.",
            param=param,
            n_prompt_tokens=n_prompt_tokens,
            n_ctx=n_ctx,
        )


class UnsupportedCapability(InvalidRequest):
    code = "unsupported_capability"


class UnsupportedParameter(InvalidRequest):
    """A field that asks for output the daemon cannot give (OpenAI's own code for it): refused
    rather than ignored, so the client never takes free text for what it asked for."""

    code = "unsupported_parameter"


class InvalidHost(InvalidRequest):
    """A Host header that is missing, repeated, or not `host[:port]` (RFC 7230 section 5.4 asks
    for a 400: it is a malformed request, not a name the device refuses to answer to)."""

    code = "invalid_host"


class AmbiguousFraming(InvalidRequest):
    """Both Transfer-Encoding and Content-Length: a proxy in front may read the body's end
    differently than thoxd does (request smuggling), so the connection closes too."""

    code = "ambiguous_framing"

    @property
    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class PreviousResponseNotFound(InvalidRequest):
    """A `previous_response_id` that names no stored response: a 400, as OpenAI answers it (the
    request is what is wrong), with OpenAI's code, which clients check to resend the history."""

    code = "previous_response_not_found"

    def __init__(self, response_id: str) -> None:
        super().__init__(
            f"Previous response with id '{_shown(response_id)}' not found. Responses are kept in"
            " memory (the most recent ones, while the daemon runs) and only with 'store': true.",
            param="previous_response_id",
        )


class NotFound(ThoxdError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str, *, param: str = "model") -> None:
        shown = model if len(model) <= 64 else model[:64] + "..."
        super().__init__(
            f"The model '{shown}' does not exist. GET /v1/models lists the models on this device.",
            param=param,
        )


class ResponseNotFound(NotFound):
    code = "response_not_found"

    def __init__(self, response_id: str) -> None:
        super().__init__(f"Response with id '{_shown(response_id)}' not found.")


def _shown(name: str) -> str:
    # A client's string in a message: cut short, so an absurd one cannot fill the log.
    return name if len(name) <= 64 else name[:64] + "..."


class InvalidApiKey(ThoxdError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="thoxd"'}


class Forbidden(ThoxdError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class HostNotAllowed(Forbidden):
    code = "host_not_allowed"


class ClientNotAllowed(Forbidden):
    code = "client_not_allowed"


class OriginNotAllowed(Forbidden):
    code = "origin_not_allowed"


class RequestTimeout(ThoxdError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"

    @property
    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class ModelBusy(ThoxdError):
    status = 409
    type = "invalid_request_error"
    code = "model_busy"


class RateLimitExceeded(ThoxdError):
    """`type` says which limit: "requests" (per minute, burst) or "tokens" (per day), as
    OpenAI's own 429s do. `limit_headers` are the X-RateLimit-* of the refusal."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, kind: str, retry_after: int, limit_headers: dict[str, str]
    ) -> None:
        super().__init__(message, retry_after=retry_after)  # in the body too: a WebSocket has
        self.kind = kind  # no headers per message
        self.retry_after = retry_after
        self.limit_headers = limit_headers

    @property
    def headers(self) -> dict[str, str]:
        return {**self.limit_headers, "Retry-After": str(self.retry_after)}

    def envelope(self) -> dict[str, Any]:
        envelope = super().envelope()
        envelope["error"]["type"] = self.kind
        return envelope


class ModelFileRejected(ThoxdError):
    status = 422
    type = "invalid_request_error"
    code = "model_file_rejected"

    def __init__(self, model_id: str, reason: str) -> None:
        super().__init__(f"The model '{model_id}' cannot be loaded: {reason}.", param="model")


class InsufficientMemory(ThoxdError):
    status = 507
    type = "server_error"
    code = "insufficient_memory"


class PayloadTooLarge(ThoxdError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body is larger than the limit of {limit} bytes.")


class UnsupportedMediaType(ThoxdError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class Unavailable(ThoxdError):
    status = 503
    code = "unavailable"
    retry_after: ClassVar[int] = 1

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class QueueFull(Unavailable):
    code = "queue_full"

    def __init__(self, waiting: int) -> None:
        super().__init__(
            f"The server is busy: {waiting} requests are already waiting. Retry shortly."
        )


class MemoryBusy(Unavailable):
    code = "memory_busy"
    retry_after = 5


class ShuttingDown(Unavailable):
    code = "shutting_down"
    retry_after = 5


class TooManyConnections(Unavailable):
    code = "too_many_connections"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The server has {limit} connections open, its limit (max_connections). Retry shortly."
        )


class PeerUnavailable(ThoxdError):
    """A request forwarded to another box of the fleet (thoxd/fleet/) found it gone."""

    status = 502
    code = "peer_unavailable"


class EngineFailure(ThoxdError):
    code = "engine_error"
