"""Where a request runs: here, or on a peer (thoxd/fleet/peers.py), and which peers first.

    a request a peer forwarded           here, always (one hop at most: no loops)
    a model split over RPC servers       its own process (thoxd/fleet/split.py)
    a model this box does not serve      the trusted peers serving it, least loaded first
    a model that failed here             the same
    a model loaded here, a slot free     here
    ... every slot busy                  peers with a free slot for it, least loaded first;
                                         none: it waits here (unless the queue here is full,
                                         then any peer serving it)
    a model not loaded here              here: it loads, as on a box alone

Keys, rate limits and fair share have been applied by then (thoxd/guards/access.py): they
belong to the box the client talks to.
"""

from __future__ import annotations

from thoxd.engine import Engine
from thoxd.errors import ModelNotFound
from thoxd.fleet.peers import Fleet, Peer, PeerModel
from thoxd.fleet.split import SplitModels


class Router:
    def __init__(
        self, fleet: Fleet, engine: Engine, default_model: str, split: SplitModels | None = None
    ) -> None:
        self.fleet = fleet
        self._engine = engine
        self._default = default_model
        self._split = split

    def forwards(self) -> bool:
        """Whether any request could go elsewhere now."""
        return bool(self._split) or (self.fleet.trust.on and self.fleet.any_usable())

    def here(self, name: str | None) -> bool:
        """Whether this daemon serves `name` itself (in its catalog, and not split)."""
        try:
            spec = self._engine.catalog.get(name or self._default)
        except ModelNotFound:
            return False
        return not (self._split and self._split.route(spec.id))

    async def ready(self, peer: Peer) -> None:
        """Before a request goes to `peer`: a split model's process may be (re)starting."""
        if self._split:
            await self._split.ready(peer)

    def choose(self, name: str | None) -> list[tuple[Peer, PeerModel]]:
        """The peers to try, in order, before this box; empty: serve it here."""
        name = name or self._default
        try:
            spec = self._engine.catalog.get(name)
        except ModelNotFound:
            spec = None
        if spec is not None and self._split and (own := self._split.route(spec.id)):
            return own
        candidates = self.fleet.usable(name) if self.fleet.trust.on else []
        if not candidates:
            return []
        if spec is None:
            return candidates
        if self._engine.state(spec.id) == "error":
            return candidates
        model = self._engine.resident(spec.id)
        if model is None:
            return []
        stats = model.stats()
        if stats.running + stats.waiting < stats.slots:
            return []
        if stats.waiting >= self._engine.config.queue_size:
            return candidates
        return [(peer, m) for peer, m in candidates if peer.free_slots(m) > 0]
