"""thoxd/guards/lan.py: the Host allowlist and source addresses.

In-process through httpx's ASGITransport (which sets the client address), and on a real socket
against the `guarded` daemon (tests/guards/conftest.py).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse

from tests.conftest import Daemon
from tests.inproc import make_app, request
from thoxd.catalog.entries import Catalog
from thoxd.guards.lan import (
    HostNames,
    LocalAddresses,
    is_lan_client,
    parse_ip,
    request_host,
)


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("thox.local:8080", "thox.local"),
        ("THOX.local.", "thox.local"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[::1]:8080", "::1"),
        ("[fe80::1%25eth0]", "fe80::1%25eth0"),
        ("evil.example", "evil.example"),
        ("[::ffff:192.168.1.5]:80", "::ffff:192.168.1.5"),
        ("localhost:", "localhost"),  # RFC 3986: the port may be empty
        ("", None),
        ("[::1", None),
        # Strict: host[:port] and nothing else. urlsplit took each of these for its last host.
        ("evil.example@127.0.0.1", None),
        ("user:pw@127.0.0.1:8080", None),
        ("127.0.0.1:8080/evil", None),
        ("127.0.0.1?x", None),
        ("127.0.0.1#x", None),
        ("evil.example 127.0.0.1", None),
        ("127.0.0.1:80:80", None),
        ("127.0.0.1:abc", None),
        ("::1", None),  # an IPv6 address needs its brackets
        ("[127.0.0.1]", None),
        ("[v1.fe]", None),
        ("[::1]x", None),
        ("exa%6dple.com", None),
        ("a..b", None),
        (".", None),
        ("x" * 64 + ".local", None),  # a label is at most 63 characters
    ],
)
def test_request_host(header: str, host: str | None) -> None:
    assert request_host(header) == host


@pytest.mark.parametrize(
    ("address", "lan"),
    [
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("172.20.0.5", True),
        ("192.168.1.20", True),
        ("169.254.10.1", True),
        ("::1", True),
        ("fe80::1%eth0", True),
        ("fd12:3456::5", True),
        ("::ffff:192.168.1.20", True),
        ("8.8.8.8", False),
        ("100.64.0.1", False),
        ("172.32.0.1", False),
        ("2001:4860:4860::8888", False),
        ("::ffff:8.8.8.8", False),
    ],
)
def test_lan_clients(address: str, lan: bool) -> None:
    ip = parse_ip(address)
    assert ip is not None
    assert is_lan_client(ip) is lan


def test_host_names() -> None:
    claimed: list[str | None] = [None]
    hosts = HostNames(
        ["thox.local", "vm", "box.example", "10.9.8.7"],
        claimed=lambda: claimed[0],
        addresses=LocalAddresses(lambda: ["192.168.1.5", "fe80::1%eth0", "fd00::2"]),
    )
    for ok in ("thox.local", "localhost", "app.localhost", "127.0.0.1", "127.0.1.1", "::1"):
        assert hosts.allows(ok), ok
    for ok in ("192.168.1.5", "fe80::1", "fd00::2", "box.example", "vm", "10.9.8.7"):
        assert hosts.allows(ok), ok
    for bad in ("evil.example", "thox-2.local", "192.168.1.6", "thox.local.evil.example"):
        assert not hosts.allows(bad), bad
    claimed[0] = "thox-2.local"  # mDNS found thox.local taken: the claimed name counts from now
    assert hosts.allows("thox-2.local")
    assert HostNames(["*"], addresses=LocalAddresses(list)).allows("anything.example")


def test_local_addresses_reread_for_a_new_address() -> None:
    current = ["192.168.1.5"]
    addresses = LocalAddresses(lambda: current, min_age=0.0)
    assert parse_ip("192.168.1.5") in addresses  # type: ignore[operator]
    current = ["192.168.1.77"]  # DHCP gave the box a new address
    assert parse_ip("192.168.1.77") in addresses  # type: ignore[operator]
    assert parse_ip("192.168.1.5") not in addresses  # type: ignore[operator]


# -- in-process ------------------------------------------------------------------------------


def get(app: object, path: str = "/v1/models", **kwargs: object) -> httpx.Response:
    return asyncio.run(request(app, "GET", path, **kwargs))  # type: ignore[arg-type]


def assert_forbidden(response: httpx.Response, code: str) -> None:
    assert response.status_code == 403
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "status"}
    assert error["code"] == code


def test_host_allowlist_in_process(tmp_path: Path, catalog: Catalog) -> None:
    app = make_app(tmp_path, catalog, allowed_hosts=["llm.home.arpa"])
    assert_forbidden(get(app, host="evil.example"), "host_not_allowed")
    assert_forbidden(get(app, "/health", host="evil.example:8080"), "host_not_allowed")
    # Before routing: a path that does not exist is refused the same way.
    assert_forbidden(get(app, "/nope", host="evil.example"), "host_not_allowed")
    for host in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "thox.local", "llm.home.arpa"):
        assert get(app, host=host).status_code == 200, host


@pytest.mark.parametrize(
    "host",
    ["evil.example@127.0.0.1", "127.0.0.1@evil.example", "127.0.0.1:8080/x", "[::1]@evil"],
)
def test_malformed_host_is_400(tmp_path: Path, catalog: Catalog, host: str) -> None:
    response = get(make_app(tmp_path, catalog), headers={"Host": host})
    assert response.request.headers["host"] == host
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "status"}
    assert error["code"] == "invalid_host"


def test_two_host_headers_are_400(tmp_path: Path, catalog: Catalog) -> None:
    app = make_app(tmp_path, catalog)

    async def two_hosts(scope: dict[str, object], *args: object) -> None:
        scope["headers"] = [(b"host", b"127.0.0.1"), (b"host", b"evil.example")]
        await app(scope, *args)  # type: ignore[arg-type]

    response = asyncio.run(request(two_hosts, "GET", "/v1/models"))  # type: ignore[arg-type]
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_host"


@pytest.mark.parametrize(
    ("client", "allowed"),
    [
        ("8.8.8.8", False),
        ("2001:db8::1", False),
        ("testclient", False),  # not an address at all
        ("192.168.1.20", True),
        ("fd12::5", True),
        ("169.254.3.4", True),
    ],
)
def test_source_addresses(tmp_path: Path, catalog: Catalog, client: str, allowed: bool) -> None:
    app = make_app(tmp_path, catalog)
    response = get(app, client=(client, 1234))
    if allowed:
        assert response.status_code == 200
    else:
        assert_forbidden(response, "client_not_allowed")


def test_public_clients_when_opened(tmp_path: Path, catalog: Catalog) -> None:
    app = make_app(tmp_path, catalog, allow_public_clients=True)
    assert get(app, client=("8.8.8.8", 1234)).status_code == 200
    # The Host check still applies.
    assert_forbidden(get(app, client=("8.8.8.8", 1234), host="evil.example"), "host_not_allowed")


def test_websocket_handshake_checked(tmp_path: Path, catalog: Catalog) -> None:
    app = make_app(tmp_path, catalog)
    local = TestClient(app, client=("127.0.0.1", 1))
    with pytest.raises(WebSocketDenialResponse) as denied:
        local.websocket_connect("ws://evil.example/v1/stream").__enter__()
    assert denied.value.status_code == 403
    assert denied.value.json()["error"]["code"] == "host_not_allowed"
    public = TestClient(app, client=("8.8.8.8", 1))
    with pytest.raises(WebSocketDenialResponse) as denied:
        public.websocket_connect("ws://127.0.0.1/v1/stream").__enter__()
    assert denied.value.json()["error"]["code"] == "client_not_allowed"
    with local.websocket_connect("ws://127.0.0.1:8080/v1/stream") as ws:
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}


# -- on a real socket ----------------------------------------------------------------------


def test_websocket_handshake_host_refused_on_the_wire(guarded: Daemon) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as sock:
        sock.sendall(
            f"GET /v1/stream HTTP/1.1\r\nHost: evil.example:{guarded.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"host_not_allowed" in answer


def test_host_with_userinfo_refused_on_the_wire(guarded: Daemon) -> None:
    host = "evil.example@127.0.0.1"
    response = httpx.get(guarded.url + "/v1/models", headers={"Host": host})
    assert response.request.headers["host"] == host
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_host"


def test_websocket_handshake_with_malformed_host_is_400(tmp_path: Path, catalog: Catalog) -> None:
    local = TestClient(make_app(tmp_path, catalog), client=("127.0.0.1", 1))
    with pytest.raises(WebSocketDenialResponse) as denied:
        ws_url, host = "ws://127.0.0.1/v1/stream", "evil.example@127.0.0.1"
        local.websocket_connect(ws_url, headers={"Host": host}).__enter__()
    assert denied.value.status_code == 400
    assert denied.value.json()["error"]["code"] == "invalid_host"


def test_evil_host_refused_on_the_wire(guarded: Daemon) -> None:
    response = httpx.get(guarded.url + "/health", headers={"Host": "evil.example"})
    assert_forbidden(response, "host_not_allowed")
