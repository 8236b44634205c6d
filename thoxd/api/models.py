"""The models surface: OpenAI's `GET /v1/models[/{id}]`, and the management routes of the
self-hosted /generate server's docs (`/models/load`, `/models/unload`, `/models/current`,
`/models/available`). Reading any of them never loads a model or touches its idle clock.

Shapes (README, "Models"): every model is one object, the same in every listing:
    {"id", "object": "model", "created", "owned_by", "aliases", "description", "state",
     "context_window", "n_ctx", "max_tokens", "capabilities", "pinned", "keep_alive",
     "memory": {"total_bytes", ...} | null, "error": str (state "error" only)}
`/models/current` adds each loaded model's slots, idle time and expiry, and the budget.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from thoxd.api.schemas import ModelAction, parse
from thoxd.catalog.entries import ModelSpec
from thoxd.engine import Engine
from thoxd.errors import InvalidRequest, ModelNotFound
from thoxd.fleet.peers import Fleet
from thoxd.units import format_duration


class ModelRoutes:
    def __init__(self, engine: Engine, fleet: Fleet | None = None) -> None:
        self.engine = engine
        self.fleet = fleet

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
            Route("/models/available", self.available, methods=["GET"]),
            Route("/models/current", self.current, methods=["GET"]),
            Route("/models/load", self.load, methods=["POST"]),
            Route("/models/unload", self.unload, methods=["POST"]),
        ]

    # -- reading ------------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        data = [self.model_object(spec) for spec in self.engine.catalog]
        return JSONResponse({"object": "list", "data": data + self._fleet_models(data)})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model_id"]
        try:
            spec = self.engine.catalog.get(name)
        except ModelNotFound:
            elsewhere = [m for m in self._fleet_models([]) if name in (m["id"], *m["aliases"])]
            if not elsewhere:
                raise
            return JSONResponse(elsewhere[0])
        entry = self.model_object(spec)
        self._fleet_models([entry])
        return JSONResponse(entry)

    def _fleet_models(self, local: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """With the fleet on (thoxd/fleet/): where each model runs. `local` entries gain
        `location` "local" and `peers` (the trusted boxes that serve it too); the models only
        peers serve are returned, `location` "fleet", owned by the first box serving them."""
        if self.fleet is None or not self.fleet.trust.on:
            return []
        where: dict[str, list[str]] = {}
        aliases: dict[str, set[str]] = {}
        for peer in self.fleet.peers():
            for model in peer.models.values() if peer.trusted else ():
                where.setdefault(model.id, []).append(peer.name)
                aliases.setdefault(model.id, set()).update(model.aliases)
        for entry in local:
            entry["location"] = "local"
            entry["peers"] = where.pop(entry["id"], [])
        return [
            {
                "id": model_id,
                "object": "model",
                "created": 0,
                "owned_by": names[0],
                "aliases": sorted(aliases[model_id]),
                "location": "fleet",
                "peers": names,
            }
            for model_id, names in sorted(where.items())
        ]

    async def available(self, request: Request) -> Response:
        """The catalog, with what each model would cost to load (read from its GGUF header)."""
        estimates = await asyncio.to_thread(
            lambda: {spec.id: self.engine.estimate(spec) for spec in self.engine.catalog}
        )
        data = []
        for spec in self.engine.catalog:
            entry = self.model_object(spec)
            estimate = estimates[spec.id]
            entry["memory_estimate"] = estimate.as_dict() if estimate else None
            data.append(entry)
        # `models`: the list locallab-client's list_models() reads (the /generate server's).
        body = {"object": "list", "data": data, "models": data, "memory": self._budget()}
        return JSONResponse(body)

    async def current(self, request: Request) -> Response:
        now, wall = time.monotonic(), time.time()
        data = []
        for model in sorted(self.engine.loaded(), key=lambda m: -m.last_used):
            entry = self.model_object(model.spec)
            stats = model.stats()
            idle = model.idle_for(now)
            expires = None
            if not (model.spec.pinned or model.busy or math.isinf(model.keep_alive)):
                expires = round(wall + max(model.keep_alive - idle, 0.0), 3)
            entry.update(
                slots={
                    "total": stats.slots,
                    "running": stats.running,
                    "waiting": stats.waiting,
                    "parked": stats.parked,  # idle prefixes kept in host memory
                },
                busy=model.busy,
                idle_seconds=round(idle, 3),
                expires_at=expires,
            )
            data.append(entry)
        return JSONResponse(
            {
                "object": "list",
                # The most recently used model: the "current model" of single-model clients.
                "model_id": data[0]["id"] if data else None,
                "data": data,
                "memory": self._budget(),
            }
        )

    def model_object(self, spec: ModelSpec) -> dict[str, Any]:
        model = self.engine.resident(spec.id)
        state = self.engine.state(spec.id)
        keep_alive = model.keep_alive if model else self.engine.keep_alive_of(spec)
        entry: dict[str, Any] = {
            "id": spec.id,
            "object": "model",
            "created": int(model.loaded_at) if model else 0,
            "owned_by": "thoxd",
            "aliases": list(spec.aliases),
            "description": spec.description,
            "state": state,
            "context_window": spec.n_ctx,
            "n_ctx": spec.n_ctx,
            "max_tokens": spec.n_ctx,
            "capabilities": sorted(spec.capabilities),
            "pinned": spec.pinned,
            "keep_alive": format_duration(keep_alive),
            "memory": model.memory.as_dict() if model else None,
        }
        if state == "error":
            entry["error"] = self.engine.error(spec.id)
        return entry

    def _budget(self) -> dict[str, int]:
        used = self.engine.used()
        budget = self.engine.budget
        gpu, gpu_used = self.engine.gpu_budget, self.engine.gpu_used()
        return {
            "budget_bytes": budget,
            "used_bytes": used,
            "free_bytes": max(budget - used, 0),
            "gpu_budget_bytes": gpu,  # 0: no GPU llama.cpp can offload to
            "gpu_used_bytes": gpu_used,
        }

    # -- changing -----------------------------------------------------------------------------

    async def load(self, request: Request) -> Response:
        """Load a model and answer when it serves (already loaded: at once)."""
        action = parse(ModelAction, await request.body())
        if action.model_id is None:
            raise InvalidRequest('Say which model to load: {"model_id": ...}.', param="model_id")
        _known(self.engine, action.model_id)
        async with self.engine.use(action.model_id, action.keep_alive) as model:
            # `status`: what locallab-client's load_model() checks.
            return JSONResponse({**self.model_object(model.spec), "status": "success"})

    async def unload(self, request: Request) -> Response:
        """Unload a model now; 409 while it serves requests (nothing is cut short).

        Without a body, the current model is meant (the /generate server's form): the one
        /models/current names, the most recently used."""
        body = await request.body()
        action = parse(ModelAction, body) if body.strip() else ModelAction()
        model_id = action.model_id
        if model_id is None:
            loaded = sorted(self.engine.loaded(), key=lambda m: -m.last_used)
            if not loaded:
                raise InvalidRequest(
                    'No model is loaded; name one to unload with {"model_id": ...}.',
                    param="model_id",
                )
            model_id = loaded[0].spec.id
        spec = _known(self.engine, model_id)
        was_loaded = await self.engine.unload(spec.id)
        return JSONResponse(
            {
                "id": spec.id,
                "object": "model",
                "state": self.engine.state(spec.id),
                "unloaded": was_loaded,
                # What locallab-client's unload_model() checks.
                "status": "Model unloaded successfully" if was_loaded else "Model was not loaded",
            }
        )


def _known(engine: Engine, model_id: str) -> ModelSpec:
    """The catalog entry, or a 404 that names the body's field."""
    try:
        return engine.catalog.get(model_id)
    except ModelNotFound:
        raise ModelNotFound(model_id, param="model_id") from None
