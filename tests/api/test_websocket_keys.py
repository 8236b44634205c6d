"""/v1/stream with keys on: the key in the handshake (header or subprotocol) or the first
message, and each request counted against the key's limits. In-process, no model loaded: a
request for an unknown model answers `model_not_found`, which shows it got past the checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient, WebSocketDenialResponse

from tests.inproc import make_app
from thoxd.catalog.entries import Catalog

OWNER = "owner-key-for-the-tests-0123"
URL = "ws://127.0.0.1:8080/v1/stream"
REQUEST = {"id": "r1", "model": "no-such-model", "prompt": "hi", "max_tokens": 1}


@pytest.fixture
def app(tmp_path: Path, catalog: Catalog) -> Starlette:
    return make_app(tmp_path, catalog, owner_key=OWNER)


def client(app: Starlette) -> TestClient:
    return TestClient(app, client=("192.168.1.20", 1))


def new_key(app: Starlette, **body: Any) -> str:
    response = client(app).post(
        "http://127.0.0.1:8080/api/keys",
        json={"name": "ws", **body},
        headers={"Authorization": f"Bearer {OWNER}"},
    )
    assert response.status_code == 201
    key: str = response.json()["key"]
    return key


def error_code(event: dict[str, Any]) -> str:
    assert event["type"] == "error", event
    code: str = event["error"]["code"]
    return code


def test_a_key_in_the_handshake_header(app: Starlette) -> None:
    key = new_key(app)
    with client(app).websocket_connect(URL, headers={"Authorization": f"Bearer {key}"}) as ws:
        ws.send_json(REQUEST)
        assert error_code(ws.receive_json()) == "model_not_found"


def test_a_key_as_a_subprotocol_selects_thox_v1(app: Starlette) -> None:
    key = new_key(app)
    with client(app).websocket_connect(URL, subprotocols=["thox.v1", f"thox.key.{key}"]) as ws:
        assert ws.accepted_subprotocol == "thox.v1"  # never the one carrying the key
        ws.send_json(REQUEST)
        assert error_code(ws.receive_json()) == "model_not_found"


def test_a_wrong_key_in_the_handshake_is_401(app: Starlette) -> None:
    with pytest.raises(WebSocketDenialResponse) as denied:
        headers = {"X-Api-Key": "thox_wrong"}
        client(app).websocket_connect(URL, headers=headers).__enter__()
    assert denied.value.status_code == 401
    assert denied.value.json()["error"]["code"] == "invalid_api_key"


def test_the_first_message_authenticates(app: Starlette) -> None:
    key = new_key(app)
    with client(app).websocket_connect(URL) as ws:
        ws.send_json({"type": "auth", "key": key})
        assert ws.receive_json() == {"type": "authenticated"}
        ws.send_json(REQUEST)
        assert error_code(ws.receive_json()) == "model_not_found"
        ws.send_json({"type": "auth", "key": key})
        assert error_code(ws.receive_json()) == "invalid_value"  # once is enough


@pytest.mark.parametrize("first", [REQUEST, {"type": "auth", "key": "thox_wrong"}])
def test_without_a_key_the_connection_closes_1008(app: Starlette, first: dict[str, Any]) -> None:
    with client(app).websocket_connect(URL) as ws:
        ws.send_json(first)
        assert error_code(ws.receive_json()) == "invalid_api_key"
        assert ws.receive()["code"] == 1008


def test_each_request_counts_against_the_limits(app: Starlette) -> None:
    key = new_key(app, rate_limit={"requests_per_minute": 6, "burst": 2})
    with client(app).websocket_connect(URL, headers={"Authorization": f"Bearer {key}"}) as ws:
        codes = []
        for i in range(3):
            ws.send_json({**REQUEST, "id": f"r{i}"})
            event = ws.receive_json()
            codes.append(error_code(event))
        assert codes == ["model_not_found", "model_not_found", "rate_limit_exceeded"]
        assert event["id"] == "r2" and event["error"]["retry_after"] >= 1
