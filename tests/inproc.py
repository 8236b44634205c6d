"""The whole app in-process around an Engine that never loads a model (no lifespan runs), for
tests of the device routes and the LAN checks that need no generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette

from thoxd.app import create_app
from thoxd.catalog.entries import Catalog
from thoxd.engine.runtime import Engine, EngineConfig
from thoxd.settings import Settings

LOCAL_CLIENT = ("127.0.0.1", 40000)


def make_app(tmp: Path, catalog: Catalog, **overrides: Any) -> Starlette:
    settings = Settings(state_dir=tmp / "state", models_dir=tmp / "models", mdns=False, **overrides)
    config = EngineConfig(
        models_dir=tmp / "models", threads=1, slots=1, queue_size=1, batch_size=32
    )
    return create_app(settings, catalog=catalog, engine=Engine(catalog, config))


async def request(
    app: Starlette,
    method: str,
    path: str,
    *,
    host: str = "127.0.0.1:8080",
    client: tuple[str, int] = LOCAL_CLIENT,
    **kwargs: Any,
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as http:
        return await http.request(method, path, **kwargs)
