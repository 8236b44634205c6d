"""Keys and rate limits: who a request is from, and whether it may go on.

Off until the owner sets `owner_key`. Then:

    /health                      open
    /metrics, /system/info       loopback, or the owner key
    /api/keys, POST /models/load and /models/unload
                                 the owner key (a client key: 403 forbidden)
    everything else              a key: `Authorization: Bearer KEY` or `X-Api-Key: KEY`
                                 (401 invalid_api_key without one, or with a wrong or revoked one)

A WebSocket handshake may carry the key in those headers, or (browsers cannot set headers) as a
subprotocol `thox.key.KEY` offered next to `thox.v1`, which the server selects; without any, the
handshake is accepted and the first message must be `{"type": "auth", "key": KEY}`.

The guard puts the `Caller` in the request's state for the handlers (`caller_of`): the queue's
fair share, the usage ledger and the model restrictions count by it. Client keys, and guests by
address when `client_rate_limit` is set, pass the limiter; its X-RateLimit-* headers go on the
answer. A WebSocket's requests are counted one by one (thoxd/api/websocket.py), and on /mcp
each tool call (thoxd/api/mcp_tools.py), not the session's protocol messages.
"""

from __future__ import annotations

import hmac
import logging

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from thoxd.access import Caller, KeyStore, Limiter, Limits, UsageLedger
from thoxd.access.callers import OWNER, guest
from thoxd.access.keys import key_hash
from thoxd.errors import Forbidden, InvalidApiKey, ThoxdError
from thoxd.fleet.trust import HEADER as FLEET_HEADER
from thoxd.fleet.trust import FleetTrust
from thoxd.guards.lan import parse_ip, refuse
from thoxd.settings import Settings

logger = logging.getLogger("thoxd.security")

OPEN_PATHS = frozenset({"/health"})
LOCAL_PATHS = frozenset({"/metrics", "/system/info"})  # loopback or the owner
# Counted per tool call instead (an MCP session's protocol messages are many per call).
UNCOUNTED = frozenset({"/mcp"})
WS_PROTOCOL = "thox.v1"
WS_KEY_PROTOCOL = "thox.key."


class Access:
    """The policy and its collaborators, made once in `create_app()`."""

    def __init__(
        self,
        settings: Settings,
        store: KeyStore,
        ledger: UsageLedger,
        limiter: Limiter,
        fleet: FleetTrust | None = None,
    ) -> None:
        owner = settings.owner_key
        self.fleet = fleet
        self._owner_hash = key_hash(owner.get_secret_value()) if owner is not None else None
        self.store = store
        self.ledger = ledger
        self.limiter = limiter
        self.guest_limits = (
            Limits(
                requests_per_minute=settings.client_rate_limit,
                burst=settings.client_rate_burst,
                tokens_per_day=0,
            )
            if settings.client_rate_limit
            else None
        )

    @property
    def keys_on(self) -> bool:
        return self._owner_hash is not None

    def identify(self, key: str | None, address: str) -> Caller:
        """The caller `key` names (keys on), or the guest at `address` (keys off)."""
        if self._owner_hash is None:
            return guest(address, self.guest_limits)
        if not key:
            raise InvalidApiKey(
                "This device needs an API key: send it as 'Authorization: Bearer KEY' "
                "(the owner hands out keys)."
            )
        if hmac.compare_digest(key_hash(key), self._owner_hash):
            return OWNER
        record = self.store.resolve(key)
        if record is None:
            logger.info("refused a request from %s: invalid API key", address[:64])
            raise InvalidApiKey("Invalid API key provided (unknown, or revoked).")
        self.ledger.used(record.id)
        return record.caller()

    def peer(self, headers: Headers, method: str, path: str) -> Caller | None:
        """The client a trusted peer forwarded this request for (thoxd/fleet/trust.py): its
        keys and limits were applied at that box. None without a valid fleet signature (an
        invalid one is ignored: the request is then judged as any other)."""
        value = headers.get(FLEET_HEADER)
        if value is None or self.fleet is None:
            return None
        signed = self.fleet.verify(value, method, path)
        if signed is None:
            logger.info("ignored an invalid fleet signature on %s", path)
            return None
        return Caller(f"{signed.sender[:8]}/{signed.client}", f"fleet:{signed.sender[:8]}")

    def owner_only(self, caller: Caller, what: str) -> None:
        if self.keys_on and not caller.owner:
            raise Forbidden(f"{what} is the owner's: it needs the owner key.")


def given_key(headers: Headers) -> str | None:
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if key := headers.get("x-api-key", "").strip():
        return key
    for protocol in headers.get("sec-websocket-protocol", "").split(","):
        if protocol.strip().startswith(WS_KEY_PROTOCOL):
            return protocol.strip()[len(WS_KEY_PROTOCOL) :]
    return None


def _owner_route(method: str, path: str) -> str | None:
    if path == "/api/keys" or path.startswith("/api/keys/"):
        return "Managing keys"
    if method == "POST" and path in ("/models/load", "/models/unload"):
        return "Loading and unloading models"
    return None


def caller_of(connection: HTTPConnection) -> Caller:
    """Who a request comes from, as the guard resolved it (a guest by address otherwise: an app
    built without the guard, in tests)."""
    caller = connection.scope.get("state", {}).get("caller")
    if isinstance(caller, Caller):
        return caller
    return guest(connection.client.host if connection.client else "", None)


class AccessGuard:
    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        limit_headers: dict[str, str] = {}
        try:
            caller = self._admit(scope)
            if caller is not None and scope["type"] == "http" and scope["path"] not in UNCOUNTED:
                limit_headers = await self.access.limiter.admit(caller)
        except ThoxdError as error:
            await refuse(scope, receive, send, error)
            return
        scope.setdefault("state", {})["caller"] = caller  # None: a WebSocket's first message
        if scope["type"] != "http" or not limit_headers:
            await self.app(scope, receive, send)
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in limit_headers.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_limits)

    def _admit(self, scope: Scope) -> Caller | None:
        access = self.access
        headers = Headers(scope=scope)
        address = str(scope["client"][0]) if scope.get("client") else ""
        key = given_key(headers)
        path = scope["path"]
        if (peer := access.peer(headers, scope.get("method", "GET"), path)) is not None:
            scope.setdefault("state", {})["fleet_hop"] = True  # served here, never sent on
            if _owner_route(scope.get("method", "GET"), path) is None:
                return peer
        if path in LOCAL_PATHS and access.keys_on and key is None:
            ip = parse_ip(address)
            if ip is not None and ip.is_loopback:
                return OWNER  # the box's own tools: what /metrics and /system/info serve
        if scope["type"] == "websocket" and key is None and access.keys_on:
            return None  # the first message authenticates (thoxd/api/websocket.py)
        caller = access.identify(key, address)
        if path in LOCAL_PATHS and not caller.owner and access.keys_on:
            raise Forbidden(f"{path} is open to the device itself and the owner key only.")
        if (what := _owner_route(scope.get("method", "GET"), path)) is not None:
            access.owner_only(caller, what)
        return caller
