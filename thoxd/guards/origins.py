"""Browser origins: which web pages may use the box through a visitor's browser.

    origin_allowed    a page may use the device when it was served by the device itself (the
                      host the browser reached us by, or loopback on both sides), or when its
                      origin is in `allowed_origins` ("*": any). The WebSocket handshake and
                      state-changing requests (guards/cross_site.py) check it.
    cors_middleware   CORS for `allowed_origins` only; never credentials, so never `*` together
                      with credentials.

Clients that send no `Origin` (SDKs, scripts, curl) are not browsers and are not asked.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from thoxd.guards.lan import request_host


def normal_origins(origins: Iterable[str]) -> frozenset[str]:
    return frozenset(_normal_origin(o) for o in origins)


def origin_allowed(origin: str, host: str | None, allowed: frozenset[str]) -> bool:
    """Whether a browser page from `origin` may use the device reached as `host` (Host header)."""
    if "*" in allowed or _normal_origin(origin) in allowed:
        return True
    # A serialized origin is scheme://host[:port], nothing more: read it as strictly as Host.
    scheme, sep, authority = origin.strip().partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return False
    origin_host = request_host(authority)
    served_as = request_host(host) if host else None
    if not origin_host or not served_as:
        return False
    return origin_host == served_as or (_loopback(origin_host) and _loopback(served_as))


def _normal_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def _loopback(hostname: str) -> bool:
    if hostname == "localhost" or hostname.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def cors_middleware(allowed_origins: Iterable[str]) -> list[Middleware]:
    """CORS for the listed origins (the WebSocket's `allowed_origins`); none when empty."""
    origins = sorted({o.strip().rstrip("/") for o in allowed_origins})
    if not origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            allow_credentials=False,  # never: so "*" can never go with credentials
            allow_private_network=True,  # Chrome's Private Network Access preflights
            # What a page may read: when to retry, where it stands with its limits, its request id.
            expose_headers=[
                "Retry-After",
                "X-Request-Id",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
                "X-RateLimit-Limit-Tokens",
                "X-RateLimit-Remaining-Tokens",
            ],
        )
    ]
