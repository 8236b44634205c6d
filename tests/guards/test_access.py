"""Keys on: which routes need which key, in-process (no model is loaded)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from tests.inproc import LOCAL_CLIENT, make_app, request
from thoxd.catalog.entries import Catalog

OWNER = "owner-key-for-the-tests-0123"
LAN_CLIENT = ("192.168.1.20", 40000)


def call(
    app: Starlette, method: str, path: str, key: str | None = None, **kw: Any
) -> httpx.Response:
    headers = dict(kw.pop("headers", {}))
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    kw.setdefault("client", LAN_CLIENT)
    return asyncio.run(request(app, method, path, headers=headers, **kw))


@pytest.fixture
def app(tmp_path: Path, catalog: Catalog) -> Starlette:
    return make_app(tmp_path, catalog, owner_key=OWNER)


def new_key(app: Starlette, **body: Any) -> dict[str, Any]:
    response = call(app, "POST", "/api/keys", OWNER, json={"name": "alice", **body})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["status"]) == (code, status)


def test_health_stays_open(app: Starlette) -> None:
    assert call(app, "GET", "/health").status_code in (200, 503)


@pytest.mark.parametrize(
    "path", ["/v1/models", "/models/current", "/api/keys", "/v1/usage", "/mcp", "/nowhere"]
)
def test_every_api_route_needs_a_key(app: Starlette, path: str) -> None:
    response = call(app, "GET", path)
    assert_error(response, 401, "invalid_api_key")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert_error(call(app, "GET", path, "thox_not-a-real-key"), 401, "invalid_api_key")


def test_a_client_key_works_by_bearer_and_x_api_key(app: Starlette) -> None:
    key = new_key(app)["key"]
    assert call(app, "GET", "/v1/models", key).status_code == 200
    assert call(app, "GET", "/v1/models", headers={"X-Api-Key": key}).status_code == 200
    assert call(app, "GET", "/v1/models", headers={"Authorization": f"bearer {key}"}).is_success


def test_a_revoked_key_stops_at_once(app: Starlette) -> None:
    created = new_key(app)
    assert call(app, "GET", "/v1/models", created["key"]).status_code == 200
    deleted = call(app, "DELETE", f"/api/keys/{created['id']}", OWNER)
    assert deleted.json() == {"id": created["id"], "object": "api_key", "deleted": True}
    assert_error(call(app, "GET", "/v1/models", created["key"]), 401, "invalid_api_key")
    assert_error(call(app, "DELETE", f"/api/keys/{created['id']}", OWNER), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/keys"), ("POST", "/api/keys"), ("DELETE", "/api/keys/key_x"),
     ("POST", "/models/load"), ("POST", "/models/unload")],
)  # fmt: skip
def test_owner_routes_refuse_a_client_key(app: Starlette, method: str, path: str) -> None:
    key = new_key(app)["key"]
    assert_error(call(app, method, path, key, json={"name": "x"}), 403, "forbidden")


def test_key_listing_has_no_secret(app: Starlette) -> None:
    created = new_key(app, rate_limit={"requests_per_minute": 5}, models=["thox-coder"])
    [listed] = call(app, "GET", "/api/keys", OWNER).json()["data"]
    assert listed["id"] == created["id"] and listed["prefix"] == created["key"][:9]
    assert listed["rate_limit"] == {"requests_per_minute": 5, "burst": 10, "tokens_per_day": 100000}
    assert "key" not in listed and created["key"] not in str(listed)


@pytest.mark.parametrize(
    "body",
    [{}, {"name": ""}, {"name": "x", "rate_limit": {"burst": 0}}, {"name": "x", "extra": 1},
     {"name": "x", "rate_limit": {"requests_per_minute": "60"}}],
)  # fmt: skip
def test_bad_key_bodies_are_400(app: Starlette, body: dict[str, Any]) -> None:
    assert_error(call(app, "POST", "/api/keys", OWNER, json=body), 400, "invalid_value")


def test_a_key_for_an_unknown_model_is_404(app: Starlette) -> None:
    response = call(app, "POST", "/api/keys", OWNER, json={"name": "x", "models": ["nope"]})
    assert_error(response, 404, "model_not_found")


def test_metrics_and_system_info_open_to_loopback_or_the_owner(app: Starlette) -> None:
    key = new_key(app)["key"]
    for path in ("/metrics", "/system/info"):
        assert call(app, "GET", path, client=LOCAL_CLIENT).status_code == 200
        assert call(app, "GET", path, OWNER).status_code == 200
        assert_error(call(app, "GET", path, key), 403, "forbidden")
        assert_error(call(app, "GET", path), 401, "invalid_api_key")


def test_a_client_key_is_rate_limited_with_headers(app: Starlette) -> None:
    key = new_key(app, rate_limit={"requests_per_minute": 6, "burst": 2})["key"]
    answers = [call(app, "GET", "/v1/models", key) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["1", "0", "0"]
    assert all(a.headers["x-ratelimit-limit"] == "6" for a in answers)
    assert all(int(a.headers["x-ratelimit-reset"]) >= 0 for a in answers)
    assert_error(answers[2], 429, "rate_limit_exceeded")
    assert int(answers[2].headers["retry-after"]) >= 1
    # The owner is never limited, and carries no limit headers.
    owner = [call(app, "GET", "/v1/models", OWNER) for _ in range(5)]
    assert all(a.status_code == 200 and "x-ratelimit-limit" not in a.headers for a in owner)


def test_keys_off_everything_is_open_and_key_routes_say_so(
    tmp_path: Path, catalog: Catalog
) -> None:
    app = make_app(tmp_path, catalog)
    assert call(app, "GET", "/v1/models").status_code == 200
    assert call(app, "GET", "/metrics").status_code == 200
    assert "x-ratelimit-limit" not in call(app, "GET", "/v1/models").headers
    assert_error(call(app, "GET", "/api/keys"), 403, "forbidden")


def test_keys_off_guests_are_limited_by_address_when_asked(
    tmp_path: Path, catalog: Catalog
) -> None:
    app = make_app(tmp_path, catalog, client_rate_limit=60, client_rate_burst=2)
    first = [call(app, "GET", "/v1/models").status_code for _ in range(3)]
    other = call(app, "GET", "/v1/models", client=("192.168.1.21", 40000))
    assert first == [200, 200, 429] and other.status_code == 200
    assert other.headers["x-ratelimit-remaining"] == "1"


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
     ("/v1/completions", {"prompt": "hi"}), ("/v1/embeddings", {"input": "hi"}),
     ("/v1/responses", {"input": "hi"})],
)  # fmt: skip
def test_a_key_is_refused_a_model_outside_its_list(
    app: Starlette, path: str, body: dict[str, Any]
) -> None:
    key = new_key(app, models=["gemma3"])["key"]  # an alias: stored as its catalog id
    response = call(app, "POST", path, key, json={"model": "thox-coder", **body})
    assert_error(response, 403, "forbidden")
    assert response.json()["error"]["param"] == "model"
