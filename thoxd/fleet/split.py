"""Models split over llama.cpp RPC servers, each served by a thoxd of its own.

llama.cpp aborts the process that holds a split model when one of its RPC servers goes away
(measured: the whole daemon, every client of every model with it). So with `rpc_isolate` (the
default) such a model never loads in the daemon: a child thoxd on a loopback port serves it alone
(its own engine, the same catalog and models, no mDNS, no fleet, no keys: it is reached only from
here), supervised by thoxd/fleet/helper.py, and the router sends its requests there as to a peer.
When a server goes away the child falls over, its clients get `peer_unavailable`, and it is
started again; the daemon and its other models go on.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import httpx

from thoxd.catalog.entries import Catalog
from thoxd.fleet.helper import Supervised
from thoxd.fleet.peers import Peer, PeerModel
from thoxd.settings import Settings

STARTING = 30.0  # s a request waits for a split model's process to (re)start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SplitModels:
    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self._children: dict[str, tuple[Supervised, Peer]] = {}
        for spec in catalog:
            if not spec.rpc:
                continue
            port = _free_port()
            state = settings.state_dir / "split" / spec.id
            command = [
                sys.executable, "-m", "thoxd", "serve", "--config", str(state / "child.toml"),
                "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(state),
                "--catalog", str(settings.catalog), "--default-model", spec.id,
                "--models-dir", str(settings.resolved_models_dir),
                "--threads", str(settings.threads), "--slots", str(settings.slots),
                "--queue-size", str(settings.queue_size), "--rpc-build", str(settings.rpc_build),
                "--mdns", "false", "--fleet", "false", "--rpc-isolate", "false",
                # Its own start-up said by the daemon; its warnings and errors still come through.
                "--log-level", "debug" if settings.log_level == "debug" else "warning",
            ]  # fmt: skip
            # Nothing of the daemon's own secrets or settings: everything it needs is above.
            env = {k: v for k, v in os.environ.items() if not k.startswith("THOXD_")}
            env.pop("CREDENTIALS_DIRECTORY", None)
            env.pop("NOTIFY_SOCKET", None)  # systemd's notifications are the daemon's
            child = Supervised(f"split model {spec.id}", command, env)
            peer = Peer(f"http://127.0.0.1:{port}", f"{spec.id} (own process)", trusted=True)
            self._children[spec.id] = (child, peer)
        self._state_dir = settings.state_dir

    def __bool__(self) -> bool:
        return bool(self._children)

    def route(self, model_id: str) -> list[tuple[Peer, PeerModel]]:
        """Where a split model is served: its own process; [] for any other model."""
        if model_id not in self._children:
            return []
        _, peer = self._children[model_id]
        return [(peer, PeerModel(model_id, state="loaded"))]

    async def ready(self, peer: Peer, timeout: float = STARTING) -> None:
        """Until `peer`, if it is a split model's process, answers (it may be starting, or
        restarting after a fall): its requests wait for it rather than fail."""
        if not any(peer is own for _, own in self._children.values()):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with httpx.AsyncClient(trust_env=False, timeout=1.0) as client:
            while loop.time() < deadline:
                try:
                    if (await client.get(peer.url + "/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)

    def start(self) -> None:
        for model_id, (child, peer) in self._children.items():
            state = self._state_dir / "split" / model_id
            state.mkdir(parents=True, exist_ok=True, mode=0o700)
            (state / "child.toml").write_text("# settings come from the daemon's command line\n")
            peer.live = True
            child.start()

    async def stop(self) -> None:
        for child, _ in self._children.values():
            await child.stop()
