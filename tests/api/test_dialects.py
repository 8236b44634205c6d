"""thoxd/api/dialects.py: on a seed route every error is in the route's own shape, whoever
raised it (a guard before any handler runs, here: no model is loaded in-process)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from tests.inproc import LOCAL_CLIENT, make_app, request
from thoxd.catalog.entries import Catalog

OWNER = "owner-key-for-the-tests-0123"


def post(app: Any, path: str, **kw: Any) -> httpx.Response:
    return asyncio.run(request(app, "POST", path, client=LOCAL_CLIENT, **kw))


def test_a_rate_limit_on_generate_is_a_detail_with_retry_after(
    tmp_path: Path, catalog: Catalog
) -> None:
    app = make_app(tmp_path, catalog, client_rate_limit=60, client_rate_burst=1)
    post(app, "/generate", json={})  # uses the burst (a 400: no prompt)
    refused = post(app, "/generate", json={"prompt": "x"})
    assert refused.status_code == 429
    assert set(refused.json()) == {"detail"} and "Rate limit" in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit"] == "60"  # the guard's headers are kept
    assert refused.headers["content-type"] == "application/json"


def test_guard_errors_on_each_seed_route(tmp_path: Path, catalog: Catalog) -> None:
    app = make_app(tmp_path, catalog, owner_key=OWNER, max_body_bytes=2048)
    for path in ("/generate", "/generate/batch", "/chat", "/hf/generate"):
        missing_key = post(app, path, json={"prompt": "x"})
        assert missing_key.status_code == 401 and "API key" in missing_key.json()["detail"]
        assert missing_key.headers["www-authenticate"].startswith("Bearer")
        too_large = post(
            app, path, json={"prompt": "x" * 4096}, headers={"Authorization": f"Bearer {OWNER}"}
        )
        assert too_large.status_code == 413 and isinstance(too_large.json()["detail"], str)


def test_the_openai_routes_keep_the_envelope(tmp_path: Path, catalog: Catalog) -> None:
    app = make_app(tmp_path, catalog, owner_key=OWNER)
    for path in ("/v1/completions", "/api/v1/chat/completions", "/api/chat/completions"):
        refused = post(app, path, json={})
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
