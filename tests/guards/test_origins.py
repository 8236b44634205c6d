"""thoxd/guards/origins.py: which browser origins may use the box, and CORS for them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from tests.inproc import make_app, request
from thoxd.catalog.entries import Catalog
from thoxd.guards.origins import normal_origins, origin_allowed
from thoxd.settings import Settings


def get(app: object, path: str = "/v1/models", **kwargs: object) -> httpx.Response:
    return asyncio.run(request(app, "GET", path, **kwargs))  # type: ignore[arg-type]


ALLOWED = frozenset({"https://app.example"})


@pytest.mark.parametrize(
    ("origin", "host", "expected"),
    [
        ("http://thox.local:8080", "thox.local:8080", True),
        ("https://THOX.local", "thox.local", True),
        ("http://192.168.1.20:8080", "192.168.1.20:8080", True),
        ("http://[::1]:8080", "[::1]:8080", True),
        ("http://localhost:5173", "127.0.0.1:8080", True),
        ("https://app.example", "thox.local:8080", True),
        ("HTTPS://App.Example/", "thox.local:8080", True),
        ("https://evil.example", "thox.local:8080", False),
        ("http://thox.local.evil.example", "thox.local:8080", False),
        ("http://localhost:3000", "thox.local:8080", False),
        ("http://127.0.0.1:8080", "192.168.1.20:8080", False),
        ("null", "thox.local:8080", False),
        ("file://", "thox.local:8080", False),
        ("chrome-extension://thox.local", "thox.local:8080", False),
        ("http://[::1", "thox.local:8080", False),
        ("http://thox.local", None, False),
    ],
)
def test_origin_allowed(origin: str, host: str | None, expected: bool) -> None:
    assert origin_allowed(origin, host, ALLOWED) is expected


def test_allowed_origins_setting() -> None:
    settings = Settings(allowed_origins="https://app.example, null")
    allowed = normal_origins(settings.allowed_origins)
    assert origin_allowed("null", "thox.local:8080", allowed)
    assert origin_allowed("https://app.example", "thox.local:8080", allowed)
    assert not origin_allowed("https://evil.example", "thox.local:8080", allowed)
    assert origin_allowed("https://evil.example", "thox.local", frozenset({"*"}))
    with pytest.raises(ValidationError):
        Settings(allowed_origins=["app.example"])  # a scheme is required


def test_no_cors_by_default(tmp_path: Path, catalog: Catalog) -> None:
    app = make_app(tmp_path, catalog)
    response = get(app, headers={"Origin": "https://app.example"})
    assert response.status_code == 200
    assert not [h for h in response.headers if h.lower().startswith("access-control-")]


def test_cors_for_allowed_origins(tmp_path: Path, catalog: Catalog) -> None:
    app = make_app(tmp_path, catalog, allowed_origins=["https://app.example/"])
    response = get(app, headers={"Origin": "https://app.example"})
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-credentials" not in response.headers
    other = get(app, headers={"Origin": "https://other.example"})
    assert "access-control-allow-origin" not in other.headers
    preflight = asyncio.run(
        request(
            app,
            "OPTIONS",
            "/v1/chat/completions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,authorization",
            },
        )
    )
    assert preflight.status_code == 200
    assert "POST" in preflight.headers["access-control-allow-methods"]


def test_cors_star_never_with_credentials(tmp_path: Path, catalog: Catalog) -> None:
    app = make_app(tmp_path, catalog, allowed_origins=["*"])
    response = get(app, headers={"Origin": "https://anywhere.example", "Cookie": "a=b"})
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers
