"""Device routes: /health (readiness), /system/info (the box and its models), /metrics.

None of them loads or wakes a model: they read the engine's state and counters only. /system/info
and /metrics answer from what the background sampler and the counters already hold, so they stay
fast while tokens are being made.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from thoxd.api.metrics import CONTENT_TYPE, Metrics
from thoxd.device.info import Identity, SystemSampler, info_document
from thoxd.engine import Engine


class SystemRoutes:
    def __init__(
        self,
        engine: Engine,
        default_model: str,
        *,
        sampler: SystemSampler | None = None,
        metrics: Metrics | None = None,
        identity: Identity | None = None,
    ) -> None:
        self.engine = engine
        self.default_model = default_model
        self.sampler = sampler
        self.metrics = metrics
        self.identity = identity

    def routes(self) -> list[Route]:
        routes = [Route("/health", self.health, methods=["GET"])]
        if self.sampler is not None:
            routes.append(Route("/system/info", self.info, methods=["GET"]))
        if self.metrics is not None:
            routes.append(Route("/metrics", self.prometheus, methods=["GET"]))
        return routes

    async def health(self, request: Request) -> Response:
        """503 `loading` until the default model first serves, then 200 with slot and queue
        counts; a default model unloaded later (keep_alive, memory) loads on the next request.
        503 `error` (with the reason) while the default model failed to load, or gave up."""
        default_id = self.engine.catalog.get(self.default_model).id
        state = self.engine.state(default_id)
        ready = state == "loaded" or (state != "error" and self.engine.times_loaded(default_id))
        models = {}
        for model in self.engine.loaded():
            stats = model.stats()
            models[model.spec.id] = {
                "slots": stats.slots,
                "running": stats.running,
                "waiting": stats.waiting,
            }
        if not ready:
            body = {"status": "loading", "model": default_id}
            if state == "error":
                body.update(status="error", error=self.engine.error(default_id) or "unknown")
            return JSONResponse(body, status_code=503)
        return JSONResponse(
            {"status": "ok", "model": default_id, "model_state": state, "models": models}
        )

    async def info(self, request: Request) -> Response:
        """The device, its runtime and its models (README, "Device info"); unreadable -> null."""
        sampler = self.sampler
        assert sampler is not None
        sampler.start()  # a no-op when the lifespan started it already
        snapshot = sampler.snapshot()
        if snapshot is None:  # the first request before the first sample: take one now
            snapshot = await asyncio.to_thread(sampler.sample)
        models = sampler.readers.read("models", self._models)
        requests = self.metrics.request_counts() if self.metrics is not None else None
        document = info_document(
            snapshot,
            identity=self.identity,
            models=models or [],
            requests=requests,
            readers=sampler.readers,
        )
        return JSONResponse(document)

    def _models(self) -> list[dict[str, Any]]:
        loaded = {m.spec.id: m for m in self.engine.loaded()}
        models = []
        for spec in self.engine.catalog:
            model = loaded.get(spec.id)
            stats = model.stats() if model is not None else None
            models.append(
                {
                    "id": spec.id,
                    "state": self.engine.state(spec.id),
                    "memory_bytes": model.memory.total if model else None,
                    "n_ctx": spec.n_ctx,
                    "slots": stats.slots if stats else None,
                    "slots_busy": stats.running if stats else None,
                    "queue_depth": stats.waiting if stats else None,
                }
            )
        return models

    async def prometheus(self, request: Request) -> Response:
        assert self.metrics is not None
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)
