"""The live list of peers: other thoxd boxes, found over mDNS (thoxd/fleet/browse.py) or named
in `fleet_peers`, each polled every `fleet_poll_seconds` at GET /fleet/status for the models it
serves and its load.

A peer is used (thoxd/fleet/router.py) only while it is trusted (its last answer proved it holds
our fleet secret) and live (it answered the last poll, and no forwarded request to it failed
since). One that misses polls leaves `/fleet` at once and is forgotten after FORGET_AFTER misses
(a peer from `fleet_peers` is kept and polled on, in case it comes back); one that says goodbye
over mDNS is forgotten at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import httpx

from thoxd.fleet.trust import HEADER, FleetTrust

logger = logging.getLogger("thoxd.fleet")

STATUS_PATH = "/fleet/status"
FORGET_AFTER = 10  # missed polls, for a peer found over mDNS


@dataclass(frozen=True)
class PeerModel:
    id: str
    aliases: tuple[str, ...] = ()
    state: str = "unloaded"
    slots: int = 0
    running: int = 0
    waiting: int = 0


@dataclass(eq=False)
class Peer:
    url: str  # http://HOST:PORT, no trailing slash
    name: str  # its mDNS host name once it said so, else HOST:PORT
    static: bool = False  # from fleet_peers
    service: str | None = None  # its mDNS instance name
    id: str = ""  # its install id
    trusted: bool = False
    live: bool = False
    misses: int = 0
    models: dict[str, PeerModel] = field(default_factory=dict)
    load: dict[str, int] = field(default_factory=dict)
    forwarding: int = 0  # requests this box is forwarding to it now (its polled load lags)

    def serves(self, name: str) -> PeerModel | None:
        """The model `name` (an id or an alias) is, on this peer."""
        model = self.models.get(name)
        if model is not None:
            return model
        return next((m for m in self.models.values() if name in m.aliases), None)

    def free_slots(self, model: PeerModel) -> int:
        """Slots it could start a request in now; a model it has not loaded counts as one free
        slot when nothing waits there (it loads on demand, as this box would)."""
        if model.state == "loaded":
            return model.slots - model.running - model.waiting - self.forwarding
        return 1 if not self.load.get("waiting") and not self.forwarding else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "id": self.id or None,
            "trusted": self.trusted,
            "models": sorted(self.models),
            "load": {**self.load, "forwarding": self.forwarding},
        }


class Fleet:
    def __init__(self, trust: FleetTrust, *, static: list[str], poll_seconds: float = 2.0) -> None:
        self.trust = trust
        self._poll_seconds = poll_seconds
        self._peers: dict[str, Peer] = {}
        self._selves: set[str] = set()  # URLs that turned out to be this box
        for url in static:
            url = url.rstrip("/")
            self._peers[url] = Peer(url, url.split("://", 1)[-1], static=True)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(2.0), trust_env=False)
        # Forwarded requests: a generation streams for as long as it takes.
        self.forwarder = httpx.AsyncClient(
            timeout=httpx.Timeout(5.0, read=None), trust_env=False, follow_redirects=False
        )
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # -- what the router and /fleet read ------------------------------------------------------

    def peers(self) -> list[Peer]:
        """Every peer that answered its last poll, trusted or not."""
        return [p for p in self._peers.values() if p.live]

    def any_usable(self) -> bool:
        return any(p.live and p.trusted for p in self._peers.values())

    def usable(self, name: str) -> list[tuple[Peer, PeerModel]]:
        """Trusted, live peers serving `name`, the least loaded first."""
        found = [
            (peer, model)
            for peer in self._peers.values()
            if peer.live and peer.trusted and (model := peer.serves(name)) is not None
        ]
        return sorted(
            found, key=lambda pm: (-pm[0].free_slots(pm[1]), pm[1].waiting, pm[0].forwarding)
        )

    def failed(self, peer: Peer) -> None:
        """A forwarded request found it gone: out of use until it answers a poll again."""
        if peer.live:
            logger.warning("fleet: %s (%s) stopped answering", peer.name, peer.url)
        peer.live = False
        peer.misses += 1
        self._wake.set()  # poll now: if it is really gone, forget it sooner

    # -- what mDNS tells ----------------------------------------------------------------------

    def found(self, service: str, name: str, url: str) -> None:
        url = url.rstrip("/")
        if url in self._selves:
            return
        peer = self._peers.get(url)
        if peer is None:
            peer = self._peers[url] = Peer(url, name, service=service)
            logger.info("fleet: found %s at %s", name, url)
        peer.service, peer.name = service, name
        self._wake.set()

    def lost(self, service: str) -> None:
        for url, peer in list(self._peers.items()):
            if peer.service == service and not peer.static:
                logger.info("fleet: %s said goodbye", peer.name)
                del self._peers[url]

    # -- polling ------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="thoxd-fleet")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()
        await self.forwarder.aclose()

    async def _run(self) -> None:
        while True:
            await self.poll()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_seconds)

    async def poll(self) -> None:
        """Ask every peer once, all at the same time."""
        await asyncio.gather(*(self._poll(p) for p in list(self._peers.values())))

    async def _poll(self, peer: Peer) -> None:
        headers = {}
        challenge = ""
        if self.trust.on:
            challenge = headers[HEADER] = self.trust.sign("GET", STATUS_PATH)
        try:
            response = await self._client.get(peer.url + STATUS_PATH, headers=headers)
            body = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            self._missed(peer, type(exc).__name__)
            return
        if response.status_code in (401, 403):  # keys on over there, and we are no fleet of it
            self._update(peer, {}, trusted=False)
            return
        if not isinstance(body, dict) or not isinstance(body.get("models"), list):
            self._missed(peer, f"status {response.status_code}")
            return
        if body.get("id") == self.trust.self_id:  # this very box, by another address
            self._selves.add(peer.url)
            self._peers.pop(peer.url, None)
            return
        self._update(peer, body, trusted=self.trust.proves(challenge, body.get("proof")))

    def _update(self, peer: Peer, body: dict[str, Any], *, trusted: bool) -> None:
        if not peer.live:
            logger.info("fleet: %s is up (%s)", peer.name, "trusted" if trusted else "untrusted")
        peer.live, peer.misses, peer.trusted = True, 0, trusted
        peer.id = str(body.get("id") or peer.id)
        if isinstance(body.get("name"), str) and peer.service is None:
            peer.name = body["name"]
        peer.models = {}
        for entry in body.get("models", []):
            with contextlib.suppress(TypeError, ValueError, KeyError):
                model = PeerModel(
                    id=str(entry["id"]),
                    aliases=tuple(str(a) for a in entry.get("aliases", ())),
                    state=str(entry.get("state", "unloaded")),
                    slots=int(entry.get("slots", 0)),
                    running=int(entry.get("running", 0)),
                    waiting=int(entry.get("waiting", 0)),
                )
                peer.models[model.id] = model
        load = body.get("load")
        peer.load = {k: int(v) for k, v in load.items()} if isinstance(load, dict) else {}

    def _missed(self, peer: Peer, why: str) -> None:
        if peer.live:
            logger.warning("fleet: %s (%s) did not answer: %s", peer.name, peer.url, why)
        peer.live = False
        peer.misses += 1
        if peer.misses >= FORGET_AFTER and not peer.static:
            self._peers.pop(peer.url, None)
