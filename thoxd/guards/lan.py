"""Safe on a LAN: who may talk to the box, by which name, and how slowly.

The daemon binds 0.0.0.0 on purpose, so every request passes these checks first:

    LanGuard              403 for a client outside loopback, RFC 1918, link-local and ULA
                          (`allow_public_clients` opens it), then 403 for a Host header that is
                          not one of the box's names or addresses (DNS rebinding: a web page on
                          evil.example whose name now resolves to 192.168.1.5 still sends
                          `Host: evil.example`). WebSocket handshakes too.
    CORS                  only when `allowed_origins` is set; never credentials, so never `*`
                          together with credentials.
    BodyTimeoutMiddleware 408 when a request body has not arrived `body_timeout_seconds` after
                          its headers.
    header_timeout_protocol
                          uvicorn's h11 protocol with a deadline for the request headers: a
                          connection that sends nothing, or dribbles its headers, is closed after
                          `header_timeout_seconds` (with a 408 if part of a request came).

uvicorn has neither timeout: without them a client that opens a socket and sends a byte now and
then holds a connection (and its memory) forever.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable, Iterable
from typing import ClassVar
from urllib.parse import urlsplit

import h11
import psutil  # type: ignore[import-untyped]
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from thoxd.errors import ClientNotAllowed, HostNotAllowed, RequestTimeout, ThoxdError

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


def request_host(value: str) -> str | None:
    """The host part of a Host header, lowercased, without port, brackets or final dot."""
    try:
        host = urlsplit("//" + value.strip()).hostname
    except ValueError:
        return None
    return host.rstrip(".") if host else None


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
                await _refuse(scope, receive, send, error)
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
        value = next((v for k, v in scope["headers"] if k == b"host"), None)
        host = request_host(value.decode("latin-1")) if value is not None else None
        if host is None or not self.hosts.allows(host):
            shown = (host or "")[:64]
            logger.info("refused a request for host %r (not one of this device's names)", shown)
            return HostNotAllowed(
                f"This device does not answer to the host name '{shown}'. "
                "Use its .local name or address, or add the name to allowed_hosts."
            )
        return None


async def _refuse(scope: Scope, receive: Receive, send: Send, error: ThoxdError) -> None:
    body = json.dumps(error.envelope()).encode()
    if scope["type"] == "http":
        response = JSONResponse(error.envelope(), status_code=error.status)
        await response(scope, receive, send)
    elif "websocket.http.response" in scope.get("extensions", {}):
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "websocket.http.response.start", "status": 403, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})  # before accept: a 403


class BodyTimeoutMiddleware:
    """The whole request body must arrive within `seconds` of the headers; else 408 and close.

    Only while the body is still coming: waiting for `http.disconnect` afterwards (a long
    generation) has no deadline.
    """

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.seconds
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                logger.info("request body not received within %.0f s; 408", self.seconds)
                raise RequestTimeout(
                    f"The request body did not arrive within {self.seconds:g} seconds."
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)


def cors_middleware(allowed_origins: Iterable[str]) -> list[Middleware]:
    """CORS for the listed origins (the WebSocket's `allowed_origins`); none when empty."""
    origins = sorted({o.strip().rstrip("/") for o in allowed_origins})
    if not origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            allow_credentials=False,  # never: so "*" can never go with credentials
            allow_private_network=True,  # Chrome's Private Network Access preflights
            expose_headers=["Retry-After"],
        )
    ]


# -- the header deadline, in uvicorn's h11 protocol ------------------------------------------


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, plus a deadline for each request's headers.

    The clock starts when the connection opens, and for later requests on a kept-alive
    connection at their first byte (idle time between requests is uvicorn's keep-alive
    timeout). It stops when the headers are complete; the body has `BodyTimeoutMiddleware`.
    The same deadline covers the rest of a body that nobody reads any more (the response went
    out early, as a 404 or 413 does): uvicorn would otherwise take it at any pace.
    """

    class HeaderTimeoutProtocol(H11Protocol):
        header_timeout: ClassVar[float] = seconds
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._check()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.SEND_BODY:  # answered before the body came
                self._check()

        def _waiting(self) -> bool:
            """Whether only the client can move: its headers, or a body already answered."""
            their, ours = self.conn.their_state, self.conn.our_state
            return their is h11.IDLE or (
                their is h11.SEND_BODY and ours in (h11.DONE, h11.MUST_CLOSE)
            )

        def _check(self) -> None:
            if self._waiting() and not self.transport.is_closing():
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(self.header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or not self._waiting():
                return
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            logger.debug("closed %s: no request headers within %g s", client, self.header_timeout)
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
                self.transport.write(_timeout_response(self.header_timeout))  # say why
            self.transport.close()

    return HeaderTimeoutProtocol


def _timeout_response(seconds: float) -> bytes:
    error = RequestTimeout(f"The request headers did not arrive within {seconds:g} seconds.")
    body = json.dumps(error.envelope()).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body
