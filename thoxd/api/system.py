"""Device routes: /health (readiness for load balancers, systemd checks and people)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from thoxd.engine.runtime import Engine


class SystemRoutes:
    def __init__(self, engine: Engine, default_model: str) -> None:
        self.engine = engine
        self.default_model = default_model

    def routes(self) -> list[Route]:
        return [Route("/health", self.health, methods=["GET"])]

    async def health(self, request: Request) -> Response:
        """503 `loading` until the default model serves, then 200 with slot and queue counts."""
        default_id = self.engine.catalog.get(self.default_model).id
        state = self.engine.state(default_id)
        models = {}
        for model in self.engine.loaded():
            stats = model.stats()
            models[model.spec.id] = {
                "slots": stats.slots,
                "running": stats.running,
                "waiting": stats.waiting,
            }
        if state != "loaded":
            status = "error" if state == "error" else "loading"
            return JSONResponse({"status": status, "model": default_id}, status_code=503)
        return JSONResponse({"status": "ok", "model": default_id, "models": models})
