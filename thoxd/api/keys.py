"""Client keys, managed by the owner: `POST /api/keys`, `GET /api/keys`, `DELETE /api/keys/{id}`.

The guard (thoxd/guards/access.py) lets only the owner key reach these. A key is shown once, in
the answer that creates it; lists show its id, name, dates, first characters and limits.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from thoxd.access import KeyStore, Limits
from thoxd.api.schemas import parse
from thoxd.engine import Engine
from thoxd.errors import Forbidden, NotFound
from thoxd.guards.access import Access


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=128)
    rate_limit: Limits = Field(default_factory=Limits)  # 0: no limit
    models: list[str] | None = Field(None, min_length=1, max_length=256)


class KeyRoutes:
    def __init__(self, engine: Engine, access: Access) -> None:
        self.engine = engine
        self.access = access
        self.store: KeyStore = access.store

    def routes(self) -> list[Route]:
        return [
            Route("/api/keys", self.create, methods=["POST"]),
            Route("/api/keys", self.list, methods=["GET"]),
            Route("/api/keys/{key_id}", self.revoke, methods=["DELETE"]),
        ]

    def _keys_on(self) -> None:
        if not self.access.keys_on:
            raise Forbidden(
                "Keys are off on this device: the owner turns them on by setting owner_key."
            )

    async def create(self, request: Request) -> Response:
        self._keys_on()
        body = parse(CreateKey, await request.body())
        models = None
        if body.models is not None:
            # Catalog ids (aliases resolved), so a rename of an alias does not open or close it.
            models = sorted({self.engine.catalog.get(name).id for name in body.models})
        record, key = await asyncio.to_thread(self.store.create, body.name, body.rate_limit, models)
        return JSONResponse({**record.public(), "key": key}, status_code=201)

    async def list(self, request: Request) -> Response:
        self._keys_on()
        records = await asyncio.to_thread(self.store.list)
        return JSONResponse({"object": "list", "data": [r.public() for r in records]})

    async def revoke(self, request: Request) -> Response:
        self._keys_on()
        key_id = request.path_params["key_id"]
        if not await asyncio.to_thread(self.store.revoke, key_id):
            shown = key_id if len(key_id) <= 64 else key_id[:64] + "..."
            raise NotFound(f"There is no key '{shown}' (or it is revoked already).")
        return JSONResponse({"id": key_id, "object": "api_key", "deleted": True})
