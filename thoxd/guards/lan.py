"""Safe on a LAN: who may talk to the box, and by which name.

The daemon binds 0.0.0.0 on purpose, so every request passes this check first:

    LanGuard    403 for a client outside loopback, RFC 1918, link-local and ULA
                (`allow_public_clients` opens it); 400 for a Host header that is missing,
                repeated or not `host[:port]`; then 403 for a Host that is not one of the box's
                names or addresses (DNS rebinding: a web page on evil.example whose name now
                resolves to 192.168.1.5 still sends `Host: evil.example`). WebSocket handshakes
                too.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable

import psutil  # type: ignore[import-untyped]
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from thoxd.errors import ClientNotAllowed, HostNotAllowed, InvalidHost, ThoxdError

logger = logging.getLogger("thoxd.security")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Loopback, RFC 1918, link-local (IPv4 and IPv6), unique local (ULA).
LAN_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
        "::1/128", "fe80::/10", "fc00::/7",
    )
)  # fmt: skip


# -- addresses and names ----------------------------------------------------------------------


def parse_ip(text: str) -> IPAddress | None:
    """An address from a Host name or scope client: brackets, zone and IPv4-mapping removed."""
    try:
        ip = ipaddress.ip_address(text.strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_lan_client(ip: IPAddress) -> bool:
    return any(ip in net for net in LAN_NETWORKS if net.version == ip.version)


# RFC 7230 Host = uri-host [":" port], read strictly: an IPv6 literal in brackets (with an RFC
# 6874 zone), or a name of letters, digits, '-' and '_' in dot-separated labels (dotted IPv4 is
# one). Nothing else: no userinfo ('evil.example@127.0.0.1'), path, spaces or percent-escapes.
_HOST = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)(?:%25[A-Za-z0-9._~-]+)?\]"
    r"|(?P<name>[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?))"
    r"(?::[0-9]{0,5})?"
)


def request_host(value: str) -> str | None:
    """The host of a Host header, lowercased, without port, brackets or final dot; None when
    the header is not exactly `host[:port]`."""
    value = value.strip(" \t")  # optional whitespace around a field value is not part of it
    match = _HOST.fullmatch(value) if len(value) <= 300 else None
    if match is None:
        return None
    if match["ipv6"] is not None:
        try:
            ipaddress.IPv6Address(match["ipv6"])
        except ValueError:
            return None
        return value[1 : value.rindex("]")].lower()
    name = match["name"].rstrip(".").lower()
    return name if len(name) <= 253 else None


class LocalAddresses:
    """The box's own addresses (psutil.net_if_addrs), re-read when an unknown one is asked for
    (at most once per `min_age` seconds), since DHCP may hand out a new one at any time."""

    def __init__(
        self, read: Callable[[], Iterable[str]] | None = None, min_age: float = 2.0
    ) -> None:
        self._read = read or _interface_addresses
        self._min_age = min_age
        self._addresses: frozenset[IPAddress] = frozenset()
        self._read_at = float("-inf")

    def __contains__(self, ip: IPAddress) -> bool:
        if ip in self._addresses:
            return True
        if time.monotonic() - self._read_at >= self._min_age:
            self._read_at = time.monotonic()
            try:
                found = (parse_ip(a) for a in self._read())
                self._addresses = frozenset(a for a in found if a is not None)
            except Exception as exc:  # keep the last known set
                logger.warning("cannot list this machine's addresses: %r", exc)
        return ip in self._addresses


def _interface_addresses() -> list[str]:
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs]


class HostNames:
    """What a request's Host may name: localhost, the box's own addresses, the claimed mDNS name
    (read at request time: it becomes known after probing), HOSTNAME.local, the OS host name,
    and `allowed_hosts` ("*" there turns the check off)."""

    def __init__(
        self,
        names: Iterable[str],
        *,
        claimed: Callable[[], str | None] = lambda: None,
        addresses: LocalAddresses | None = None,
    ) -> None:
        self.names = frozenset(n.lower().rstrip(".").strip("[]") for n in names if n)
        self.any = "*" in self.names
        self.claimed = claimed
        self.addresses = addresses if addresses is not None else LocalAddresses()

    def allows(self, host: str) -> bool:
        if self.any or host in self.names or host == "localhost" or host.endswith(".localhost"):
            return True
        ip = parse_ip(host)
        if ip is not None:
            return ip.is_loopback or str(ip) in self.names or ip in self.addresses
        claimed = self.claimed()
        return claimed is not None and host == claimed.lower().rstrip(".")


def default_names(hostname: str, allowed_hosts: Iterable[str]) -> list[str]:
    system = socket.gethostname().split(".")[0]
    return [f"{hostname}.local", system, f"{system}.local", *allowed_hosts]


# -- middleware -------------------------------------------------------------------------------


class LanGuard:
    """The first check of every request: source address, then Host."""

    def __init__(self, app: ASGIApp, hosts: HostNames, allow_public_clients: bool) -> None:
        self.app = app
        self.hosts = hosts
        self.allow_public = allow_public_clients

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            error = self.refusal(scope)
            if error is not None:
                await refuse(scope, receive, send, error)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> ThoxdError | None:
        client = scope.get("client")
        if client is not None and not self.allow_public:
            ip = parse_ip(str(client[0]))
            if ip is None or not is_lan_client(ip):
                logger.info("refused a request from %s: not a LAN address", str(client[0])[:64])
                return ClientNotAllowed(
                    "This device serves its local network only "
                    "(set allow_public_clients to serve other addresses)."
                )
        values = [v for k, v in scope["headers"] if k == b"host"]
        host = request_host(values[0].decode("latin-1")) if len(values) == 1 else None
        if host is None:
            logger.info("refused a request without one well-formed Host header")
            return InvalidHost(
                "The request needs exactly one Host header of the form host[:port], "
                "such as thox.local:8080."
            )
        if not self.hosts.allows(host):
            shown = host[:64]
            logger.info("refused a request for host %r (not one of this device's names)", shown)
            return HostNotAllowed(
                f"This device does not answer to the host name '{shown}'. "
                "Use its .local name or address, or add the name to allowed_hosts."
            )
        return None


async def refuse(scope: Scope, receive: Receive, send: Send, error: ThoxdError) -> None:
    """Answer `error` before any handler runs: an HTTP response, or a WebSocket handshake's."""
    body = json.dumps(error.envelope()).encode()
    if scope["type"] == "http":
        response = JSONResponse(error.envelope(), status_code=error.status, headers=error.headers)
        await response(scope, receive, send)
    elif "websocket.http.response" in scope.get("extensions", {}):
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await send(
            {"type": "websocket.http.response.start", "status": error.status, "headers": headers}
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})  # before accept: a 403
