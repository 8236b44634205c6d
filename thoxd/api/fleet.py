"""The fleet's routes (thoxd/fleet/): `GET /fleet`, the peers this box knows and what each
serves, and `GET /fleet/status`, what peers poll: this box's models and their load. Both are
cheap reads; neither loads a model.

    GET /fleet          {"self": {"name", "id", "fleet", "trusted_peers"},
                         "peers": [{"name", "url", "id", "trusted", "models": [ids],
                                    "load": {"slots", "running", "waiting", "forwarding"}}]}
    GET /fleet/status   {"name", "id", "models": [{"id", "aliases", "state", "slots",
                         "running", "waiting"}], "load": {"slots", "running", "waiting"},
                         "rpc": "HOST:PORT" | null, "proof": str | null}

`proof` answers a poll signed with the fleet secret (thoxd/fleet/trust.py); with keys on,
/fleet/status needs a key or that signature.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from thoxd.device.discovery import Discovery
from thoxd.engine import Engine
from thoxd.fleet.helper import Supervised
from thoxd.fleet.peers import Fleet
from thoxd.fleet.trust import HEADER


class FleetRoutes:
    def __init__(
        self,
        engine: Engine,
        fleet: Fleet | None,
        discovery: Discovery,
        helper: Supervised | None = None,
        rpc_endpoint: str = "",
    ) -> None:
        self.engine = engine
        self.fleet = fleet
        self.discovery = discovery
        self.helper = helper
        self.rpc_endpoint = rpc_endpoint

    def routes(self) -> list[Route]:
        return [
            Route("/fleet", self.peers, methods=["GET"]),
            Route("/fleet/status", self.status, methods=["GET"]),
        ]

    def _name(self, request: Request) -> str:
        return self.discovery.host_name or f"{request.url.hostname}:{request.url.port}"

    async def peers(self, request: Request) -> Response:
        peers = self.fleet.peers() if self.fleet is not None else []
        me = {
            "name": self._name(request),
            "id": self.discovery.install_id,
            "fleet": self.fleet is not None,
            "trusted_peers": self.fleet is not None and self.fleet.trust.on,
        }
        return JSONResponse({"self": me, "peers": [p.as_dict() for p in peers]})

    async def status(self, request: Request) -> Response:
        models: list[dict[str, Any]] = []
        load = {"slots": 0, "running": 0, "waiting": 0}
        for spec in self.engine.catalog:
            entry: dict[str, Any] = {
                "id": spec.id,
                "aliases": list(spec.aliases),
                "state": self.engine.state(spec.id),
            }
            model = self.engine.resident(spec.id)
            if model is not None:
                stats = model.stats()
                counts = {"slots": stats.slots, "running": stats.running, "waiting": stats.waiting}
                entry.update(counts)
                for key, value in counts.items():
                    load[key] += value
            models.append(entry)
        proof = None
        challenge = request.headers.get(HEADER)
        trust = self.fleet.trust if self.fleet is not None else None
        if trust is not None and challenge and trust.verify(challenge, "GET", request.url.path):
            proof = trust.proof(challenge)
        body = {
            "name": self._name(request),
            "id": self.discovery.install_id,
            "models": models,
            "load": load,
            # Where this box's llama.cpp rpc-server listens, for models split over boxes.
            "rpc": self.rpc_endpoint if self.helper and self.helper.running else None,
            "proof": proof,
        }
        return JSONResponse(body)
