"""thoxd/guards/cross_site.py: what a web page elsewhere can make a visitor's browser send.

In-process (tests/inproc.py), and with the OpenAI SDK against the real daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import Daemon
from tests.inproc import make_app, request
from thoxd.catalog.entries import Catalog
from thoxd.guards.cross_site import is_json

EVIL = "https://evil.example"
CHAT = {"model": "thox-coder", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
# A body the handler refuses at once (no model named): 400 invalid_value shows it got there,
# without loading a model.
REACHES_HANDLER: dict[str, object] = {}


def post(app: object, path: str, **kwargs: Any) -> httpx.Response:
    return asyncio.run(request(app, "POST", path, **kwargs))  # type: ignore[arg-type]


def code(response: httpx.Response) -> str | None:
    error = response.json().get("error") if response.content else None
    return error["code"] if isinstance(error, dict) else None


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/json ; charset=UTF-8", True),
        ("application/merge-patch+json", True),
        ("application/vnd.api+json", True),
        ("text/plain", False),
        ("text/plain; charset=application/json", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        ("application/jsonx", False),
        ("application/json-seq", False),
        ("text/json", False),
        ("", False),
    ],
)
def test_is_json(content_type: str, expected: bool) -> None:
    assert is_json(content_type) is expected


@pytest.fixture
def app(tmp_path: Path, catalog: Catalog) -> object:
    return make_app(tmp_path, catalog)


def test_simple_cross_site_post_is_refused(app: object) -> None:
    # What a page on evil.example can send without a preflight: text/plain with a JSON text.
    chat = post(
        app,
        "/v1/chat/completions",
        host="thox.local:8080",
        headers={"Origin": EVIL, "Content-Type": "text/plain"},
        json=CHAT,
    )
    assert chat.status_code == 403
    assert code(chat) == "origin_not_allowed"
    assert EVIL in chat.json()["error"]["message"]
    # No body at all: /models/unload would act on the one loaded model.
    unload = post(app, "/models/unload", host="thox.local:8080", headers={"Origin": EVIL})
    assert unload.status_code == 403
    assert code(unload) == "origin_not_allowed"


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
def test_other_state_changing_methods_are_checked(app: object, method: str) -> None:
    response = asyncio.run(
        request(app, method, "/models/unload", headers={"Origin": EVIL})  # type: ignore[arg-type]
    )
    assert response.status_code == 403
    assert code(response) == "origin_not_allowed"


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://thox.local:8080", "thox.local:8080"),  # a page the device served itself
        ("http://localhost:5173", "127.0.0.1:8080"),  # loopback to loopback
    ],
)
def test_the_device_and_loopback_pass(app: object, origin: str, host: str) -> None:
    headers = {"Origin": origin}
    response = post(app, "/v1/chat/completions", host=host, headers=headers, json=REACHES_HANDLER)
    assert code(response) == "invalid_value"


def test_reads_from_other_origins_pass(app: object) -> None:
    response = asyncio.run(
        request(app, "GET", "/v1/models", headers={"Origin": EVIL})  # type: ignore[arg-type]
    )
    assert response.status_code == 200


def test_allowed_origins_pass_and_can_read_their_415(tmp_path: Path, catalog: Catalog) -> None:
    app = make_app(tmp_path, catalog, allowed_origins=["https://app.example"])
    headers = {"Origin": "https://app.example"}
    ok = post(app, "/v1/chat/completions", headers=headers, json=REACHES_HANDLER)
    assert code(ok) == "invalid_value"
    plain = post(
        app,
        "/v1/chat/completions",
        headers={"Origin": "https://app.example", "Content-Type": "text/plain"},
        content=b"{}",
    )
    assert plain.status_code == 415
    assert plain.headers["access-control-allow-origin"] == "https://app.example"
    preflight = asyncio.run(
        request(
            app,
            "OPTIONS",
            "/v1/chat/completions",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
    )
    assert preflight.status_code == 200
    assert "POST" in preflight.headers["access-control-allow-methods"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},  # curl -d without -H
        {},  # no Content-Type at all (a fetch() of a Blob sends none)
    ],
)
def test_a_body_that_is_not_json_is_415(app: object, headers: dict[str, str]) -> None:
    response = post(app, "/v1/chat/completions", headers=headers, content=b'{"model": "x"}')
    assert response.status_code == 415
    assert code(response) == "unsupported_media_type"
    message = response.json()["error"]["message"]
    assert "Content-Type: application/json" in message


def test_json_with_a_charset_passes(app: object) -> None:
    response = post(
        app,
        "/v1/chat/completions",
        headers={"Content-Type": "application/json; charset=utf-8"},
        content=b"{not json",
    )
    assert response.status_code == 400
    assert code(response) == "invalid_value"  # the handler read it


def test_a_post_without_a_body_passes(app: object) -> None:
    # `POST /models/unload` alone means "the one loaded model"; none is loaded here.
    response = post(app, "/models/unload")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model_id"  # the handler's own answer


# -- the OpenAI SDK against the real daemon --------------------------------------------------


@pytest.mark.slow
def test_the_openai_sdk_still_works(daemon: Daemon) -> None:
    client = OpenAI(base_url=daemon.url + "/v1", api_key="not-required", max_retries=0)
    chat = client.chat.completions.create(
        model="thox-coder", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert chat.choices[0].finish_reason in ("length", "stop")
    embedding = client.embeddings.create(model="thox-coder", input="hello")
    assert len(embedding.data[0].embedding) > 0
    # The same request as a cross-site page would send it: refused before it runs.
    refused = httpx.post(
        daemon.url + "/v1/chat/completions",
        headers={"Origin": EVIL, "Content-Type": "text/plain"},
        json=CHAT,
    )
    assert refused.status_code == 403
    assert code(refused) == "origin_not_allowed"
