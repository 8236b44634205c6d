"""Peers found over mDNS: a browser for `_thox._tcp` on the daemon's own zeroconf instance
(thoxd/device/discovery.py), started once this box is registered. Each service found is
resolved (addresses, port, TXT `id`) and handed to the Fleet; a goodbye takes it away."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

from thoxd.device.discovery import Discovery
from thoxd.fleet.peers import Fleet

logger = logging.getLogger("thoxd.fleet")

SERVICE_TYPE = "_thox._tcp.local."
RESOLVE_MS = 3000


class PeerBrowser:
    def __init__(self, discovery: Discovery, fleet: Fleet) -> None:
        self._discovery = discovery
        self._fleet = fleet
        self._browser: AsyncServiceBrowser | None = None
        self._task: asyncio.Task[None] | None = None
        self._resolving: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="thoxd-fleet-browse")

    async def stop(self) -> None:
        for task in [t for t in (self._task, *self._resolving) if t is not None]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._browser is not None:
            with contextlib.suppress(Exception):  # the zeroconf may be closed already
                await self._browser.async_cancel()

    async def _run(self) -> None:
        if not await self._discovery.wait_ready():
            logger.info("fleet: mDNS is not advertising; only fleet_peers are used")
            return
        zc = self._discovery.zeroconf
        if zc is None:
            return
        self._browser = AsyncServiceBrowser(zc, [SERVICE_TYPE], handlers=[self._changed])

    def _changed(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            self._fleet.lost(name)
            return
        task = asyncio.create_task(self._resolve(zeroconf, service_type, name))
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, RESOLVE_MS) or not info.port:
            return
        txt = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        if txt.get("id") == self._fleet.trust.self_id:
            return  # this box's own service
        addresses = info.parsed_addresses(IPVersion.V4Only) or info.parsed_addresses()
        if not addresses:
            return
        host = addresses[0]
        if ipaddress.ip_address(host.split("%")[0]).version == 6:
            host = f"[{host}]"
        server = (info.server or name).rstrip(".")
        self._fleet.found(name, server, f"http://{host}:{info.port}")
