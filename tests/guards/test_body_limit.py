"""thoxd/guards/body_limit.py: the body limit, on Content-Length and on the bytes that arrive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from thoxd.errors import ThoxdError
from thoxd.guards.body_limit import BodyLimitMiddleware

LIMIT = 1024


async def _thoxd_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ThoxdError)
    return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers)


async def echo_length(request: Request) -> Response:
    return JSONResponse({"length": len(await request.body())})


def make_app() -> Starlette:
    return Starlette(
        routes=[Route("/echo", echo_length, methods=["POST"])],
        middleware=[Middleware(BodyLimitMiddleware, max_body_bytes=LIMIT)],
        exception_handlers={ThoxdError: _thoxd_error},
    )


def post(content: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=make_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/echo", content=content, headers=headers)

    return asyncio.run(go())


async def chunks(size: int, count: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b"x" * size


def assert_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "payload_too_large"
    assert error["type"] == "invalid_request_error"
    assert str(LIMIT) in error["message"]


def test_under_the_limit_passes() -> None:
    response = post(b"a" * 100)
    assert response.status_code == 200
    assert response.json() == {"length": 100}


def test_exactly_the_limit_passes() -> None:
    response = post(b"a" * LIMIT)
    assert response.status_code == 200
    assert response.json() == {"length": LIMIT}


def test_empty_body_passes() -> None:
    response = post(b"")
    assert response.status_code == 200
    assert response.json() == {"length": 0}


def test_content_length_over_the_limit_is_413() -> None:
    response = post(b"a" * (LIMIT + 1))
    assert_too_large(response)
    assert response.headers["connection"] == "close"


def test_declared_content_length_is_refused_before_reading() -> None:
    # The header alone decides: the route never runs, so the short body is not counted.
    response = post(b"a", headers={"Content-Length": str(10 * LIMIT)})
    assert_too_large(response)


def test_chunked_body_under_the_limit_passes() -> None:
    response = post(chunks(256, 4))
    assert response.status_code == 200
    assert response.json() == {"length": 1024}


def test_chunked_body_over_the_limit_is_413() -> None:
    seen = []

    async def body() -> AsyncIterator[bytes]:
        for i in range(100):
            seen.append(i)
            yield b"x" * 300

    response = post(body())
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert_too_large(response)
    # Reading stopped at the first chunk past the limit: the rest was never pulled.
    assert len(seen) == 4


def test_one_large_chunk_over_the_limit_is_413() -> None:
    assert_too_large(post(chunks(LIMIT + 1, 1)))


def test_non_numeric_content_length_is_413() -> None:
    assert_too_large(post(b"abc", headers={"Content-Length": "abc"}))


def test_negative_content_length_is_413() -> None:
    assert_too_large(post(b"abc", headers={"Content-Length": "-3"}))


def test_other_routes_without_body_are_untouched() -> None:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=make_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/echo")

    assert asyncio.run(go()).status_code == 405
