"""The machine's network interfaces, and which of them (and which addresses) mDNS speaks for.

LAN interfaces only by default: up, multicast-capable, not loopback, not a container or VPN
bridge, whose addresses would send LAN clients nowhere. Loopback only when it is the only
interface, when `mdns_loopback` is set, or when `mdns_interfaces` names it. And only the addresses
the HTTP socket is bound to: advertising an address the API does not listen on sends clients to a
closed port.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psutil  # type: ignore[import-untyped]

logger = logging.getLogger("thoxd.discovery")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Interfaces that are up and multicast-capable but lead nowhere a LAN client can reach.
_VIRTUAL_PREFIXES = (
    "docker", "veth", "br-", "virbr", "vnet", "lxc", "lxd", "cni", "flannel", "cali", "podman",
    "tun", "tap", "wg", "zt", "tailscale", "vboxnet", "vmnet",
)  # fmt: skip


@dataclass(frozen=True)
class Nic:
    """A network interface: the little of it that matters here."""

    name: str
    index: int
    up: bool
    loopback: bool
    multicast: bool
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()  # without %scope


def local_nics() -> list[Nic]:
    """Every interface of this machine (psutil: netlink on Linux; quick, but not free)."""
    stats = psutil.net_if_stats()
    nics = []
    for name, addrs in psutil.net_if_addrs().items():
        stat = stats.get(name)
        flags = set(getattr(stat, "flags", "").split(","))
        ipv4 = tuple(a.address for a in addrs if a.family == socket.AF_INET)
        ipv6 = tuple(a.address.split("%")[0] for a in addrs if a.family == socket.AF_INET6)
        loopback = "loopback" in flags or any(ipaddress.ip_address(a).is_loopback for a in ipv4)
        try:
            index = socket.if_nametoindex(name)
        except OSError:
            index = 0
        multicast = "multicast" in flags or not flags - {""}  # no flags known: assume it can
        up = bool(stat and stat.isup)
        nics.append(Nic(name, index, up, loopback, multicast, ipv4, ipv6))
    return nics


@dataclass(frozen=True)
class Plan:
    """Where to speak mDNS and which addresses `label.local` resolves to."""

    nics: tuple[str, ...]
    interfaces: tuple[str | int, ...]  # for zeroconf: IPv4 addresses, IPv6 interface indexes
    addresses: tuple[str, ...]

    @property
    def ipv6(self) -> bool:
        return any(isinstance(i, int) for i in self.interfaces)


def plan_advertisement(
    listen: Iterable[IPAddress],
    nics: Sequence[Nic],
    *,
    interfaces: Sequence[str] = (),
    loopback: bool = False,
) -> Plan | str:
    """The plan, or why there is nothing to advertise. `listen`: where the HTTP socket is bound
    (0.0.0.0 and :: stand for every address of their family)."""
    bound = set(listen)
    any4 = ipaddress.IPv4Address("0.0.0.0") in bound
    any6 = ipaddress.IPv6Address("::") in bound
    named = set(interfaces)
    if named:
        chosen = [n for n in nics if n.up and ({n.name, *n.ipv4, *n.ipv6} & named)]
        for missing in named - {x for n in chosen for x in (n.name, *n.ipv4, *n.ipv6)}:
            logger.warning("mDNS: no up interface is named or has the address %s", missing)
    else:
        lan = [n for n in nics if n.up and not n.loopback and n.multicast]
        lan = [n for n in lan if not n.name.startswith(_VIRTUAL_PREFIXES)]
        only_loopback = not lan
        chosen = lan + [n for n in nics if n.up and n.loopback and (loopback or only_loopback)]
    names: list[str] = []
    transport: list[str | int] = []
    addresses: list[str] = []
    for nic in chosen:
        v4 = [a for a in nic.ipv4 if any4 or ipaddress.IPv4Address(a) in bound]
        v6 = [
            a
            for a in nic.ipv6
            if (any6 or ipaddress.IPv6Address(a) in bound)
            and not ipaddress.IPv6Address(a).is_link_local  # useless without a scope to clients
            and not nic.loopback  # zeroconf cannot listen on ::1
        ]
        if not v4 and not v6:
            continue
        names.append(nic.name)
        transport += v4
        if v6 and nic.index:
            transport.append(nic.index)
        addresses += v4 + v6
    if not addresses:
        if bound and all(a.is_loopback for a in bound) and not loopback and not named:
            return "the API listens on loopback only (set mdns_loopback to advertise there)"
        return "no interface carries an address the API listens on"
    return Plan(tuple(names), tuple(transport), tuple(addresses))


async def listen_addresses(host: str) -> tuple[IPAddress, ...]:
    """Where uvicorn binds for `host`: "::" (and "") mean every IPv4 and IPv6 address."""
    if host in ("", "::"):
        return (ipaddress.IPv4Address("0.0.0.0"), ipaddress.IPv6Address("::"))
    try:
        return (ipaddress.ip_address(host),)
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return tuple({ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos})
