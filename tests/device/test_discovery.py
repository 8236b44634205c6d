"""thoxd/device/discovery.py: mDNS on loopback, seen through a real python-zeroconf browser.

Everything speaks mDNS on 127.0.0.1 only (zeroconf bound there: Linux loops multicast back on lo
even without the MULTICAST flag). Every test claims a host name of its own, so tests and other
daemons on this machine never collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from tests.conftest import Daemon
from thoxd.device.discovery import (
    SERVICE_TYPES,
    Discovery,
    ProbeResult,
    candidate_labels,
    is_conflict,
    txt_record,
)
from thoxd.settings import Settings, load_settings

T = TypeVar("T")
LIMIT = 9.0  # seconds: every networked test stays under 10 s


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, LIMIT)

    return asyncio.run(bounded())


def unique_name() -> str:
    return f"thoxtest-{secrets.token_hex(4)}"


def loopback_settings(tmp: Path, port: int, hostname: str, **extra: Any) -> Settings:
    return Settings(
        host="127.0.0.1",
        port=port,
        state_dir=tmp / f"state-{port}",
        hostname=hostname,
        mdns_loopback=True,
        **extra,
    )


def parse_txt(data: bytes) -> list[tuple[str, str]]:
    entries, i = [], 0
    while i < len(data):
        n = data[i]
        key, _, value = data[i + 1 : i + 1 + n].decode("ascii").partition("=")
        entries.append((key, value))
        i += 1 + n
    return entries


class Browser:
    """A python-zeroconf browser for _thox._tcp and _http._tcp on loopback."""

    def __init__(self, aiozc: AsyncZeroconf) -> None:
        self.aiozc = aiozc
        self.present: set[str] = set()
        self.removed: set[str] = set()
        self._changed = asyncio.Event()
        self._browser = AsyncServiceBrowser(
            aiozc.zeroconf, list(SERVICE_TYPES), handlers=[self._on_change]
        )

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            self.present.discard(name)
            self.removed.add(name)
        else:
            self.present.add(name)
        self._changed.set()

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out; present: {sorted(self.present)}"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def resolve(self, type_: str, name: str) -> AsyncServiceInfo:
        info = AsyncServiceInfo(type_, name)
        assert await info.async_request(self.aiozc.zeroconf, 3000), f"{name} did not resolve"
        return info

    async def resolve_host(self, host: str) -> list[str]:
        from zeroconf import AddressResolverIPv4

        resolver = AddressResolverIPv4(host)
        assert await resolver.async_request(self.aiozc.zeroconf, 3000), f"{host} did not resolve"
        return resolver.parsed_addresses()


@contextlib.asynccontextmanager
async def loopback_browser() -> AsyncIterator[Browser]:
    aiozc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    browser = Browser(aiozc)
    try:
        yield browser
    finally:
        await browser._browser.async_cancel()
        await aiozc.async_close()


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Discovery]:
    discovery = Discovery(settings)
    await discovery.start()
    try:
        yield discovery
    finally:
        await discovery.stop()


# -- the TXT record, names, plans: no network ------------------------------------------------


def test_txt_record_keys_order_and_size() -> None:
    data = txt_record("0123456789abcdef")
    assert parse_txt(data) == [
        ("txtvers", "1"),
        ("path", "/v1"),
        ("api", "openai"),
        ("ws", "/v1/stream"),
        ("auth", "none"),
        ("id", "0123456789abcdef"),
    ]
    assert len(data) <= 200
    assert parse_txt(txt_record("0123456789abcdef", auth="key"))[4] == ("auth", "key")


def test_txt_record_refuses_to_grow_past_200_bytes() -> None:
    with pytest.raises(ValueError, match="over 200"):
        txt_record("0" * 64, auth="x" * 120)


def test_candidate_labels_count_up_and_stay_dns_labels() -> None:
    assert list(candidate_labels("thox", 4)) == ["thox", "thox-2", "thox-3", "thox-4"]
    long = "a" * 60
    assert all(len(label) <= 63 for label in candidate_labels(long, 20))
    assert list(candidate_labels(long, 20))[-1] == "a" * 60 + "-20"


def test_conflict_rules() -> None:
    own = {"127.0.0.1", "192.168.1.5"}
    nobody = ProbeResult(set(), False)
    assert not is_conflict("thox", nobody, own, "vm")
    assert is_conflict("thox", ProbeResult(set(), True), own, "vm")  # a service of that name
    assert is_conflict("thox", ProbeResult({"192.168.1.7"}, False), own, "vm")  # another box
    # Another responder on this machine (a second thoxd): our addresses, still taken.
    assert is_conflict("thox", ProbeResult({"192.168.1.5"}, False), own, "vm")
    # The system's own responder naming this machine "thox": shared, not taken.
    assert not is_conflict("thox", ProbeResult({"192.168.1.5"}, False), own, "THOX")
    assert is_conflict("thox", ProbeResult({"192.168.1.7"}, False), own, "thox")


def test_settings_fields() -> None:
    s = load_settings({"mdns_interfaces": "lo, eth0", "mdns": "false", "hostname": "box-1"})
    assert s.mdns_interfaces == ["lo", "eth0"] and s.mdns is False and s.hostname == "box-1"
    defaults = Settings()
    assert (defaults.hostname, defaults.mdns, defaults.mdns_loopback) == ("thox", True, False)
    assert defaults.mdns_interfaces == []
    for bad in ("-thox", "thox-", "tho_x", "thox.local", "a" * 61, ""):
        with pytest.raises(ValueError):
            Settings(hostname=bad)


# -- on the wire (loopback) --------------------------------------------------------------------


@pytest.mark.parametrize(("owner_key", "auth"), [(None, "none"), ("an-owner-key-0123456", "key")])
def test_browser_finds_both_services_and_resolves_the_host(
    tmp_path: Path, owner_key: str | None, auth: str
) -> None:
    name = unique_name()
    settings = loopback_settings(tmp_path, 18080, name, owner_key=owner_key)

    async def scenario() -> None:
        async with loopback_browser() as browser, running(settings) as discovery:
            assert await discovery.wait_ready(5)
            assert discovery.host_name == f"{name}.local"
            assert discovery.label == name
            expected = {f"{name}.{t}" for t in SERVICE_TYPES}
            await browser.wait_for(lambda: expected <= browser.present)
            for type_ in SERVICE_TYPES:
                info = await browser.resolve(type_, f"{name}.{type_}")
                assert info.port == 18080
                assert info.server == f"{name}.local."
                assert info.parsed_addresses() == ["127.0.0.1"]
                entries = parse_txt(info.text)
                assert entries[0] == ("txtvers", "1")
                assert [k for k, _ in entries] == ["txtvers", "path", "api", "ws", "auth", "id"]
                assert dict(entries)["id"] == discovery.install_id
                assert dict(entries)["auth"] == auth  # a client knows to bring a key
                assert len(info.text) <= 200
            assert await browser.resolve_host(f"{name}.local.") == ["127.0.0.1"]

    run(scenario())


def test_two_in_one_process_become_name_and_name_2_and_say_goodbye(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = unique_name()

    async def scenario() -> None:
        first_settings = loopback_settings(tmp_path, 18081, name)
        async with loopback_browser() as browser, running(first_settings) as first:
            assert await first.wait_ready(5) and first.host_name == f"{name}.local"
            async with running(loopback_settings(tmp_path, 18082, name)) as second:
                assert await second.wait_ready(5)
                assert second.host_name == f"{name}-2.local"
                assert second.service_names == tuple(f"{name}-2.{t}" for t in SERVICE_TYPES)
                info = await browser.resolve(SERVICE_TYPES[0], f"{name}-2.{SERVICE_TYPES[0]}")
                assert info.port == 18082 and info.server == f"{name}-2.local."
            # The second one left: goodbye packets reach the browser at once.
            gone = f"{name}-2.{SERVICE_TYPES[0]}"
            await browser.wait_for(lambda: gone in browser.removed, timeout=3)
            assert second.state == "stopped" and second.host_name is None
            assert f"{name}.{SERVICE_TYPES[0]}" in browser.present

    run(scenario())
    assert f"{name}.local is taken on the network; this box is {name}-2.local" in caplog.text


def test_install_id_persists_across_restarts(tmp_path: Path) -> None:
    settings = loopback_settings(tmp_path, 18083, unique_name(), mdns=False)

    async def twice() -> tuple[str, str]:
        async with running(settings) as one:
            first = one.install_id
        async with running(settings) as two:
            return first, two.install_id

    first, second = run(twice())
    assert first == second
    assert (settings.state_dir / "install-id").read_text().strip() == first


def test_mdns_off_registers_nothing(tmp_path: Path) -> None:
    name = unique_name()
    settings = loopback_settings(tmp_path, 18084, name, mdns=False)

    async def scenario() -> None:
        async with loopback_browser() as browser, running(settings) as discovery:
            assert not await discovery.wait_ready(1)
            assert discovery.state == "off" and discovery.host_name is None
            assert discovery._zc is None  # no socket was even opened
            await asyncio.sleep(1.5)
            assert not {n for n in browser.present if n.startswith(name)}

    run(scenario())


def test_loopback_daemon_without_mdns_loopback_stays_quiet(tmp_path: Path) -> None:
    settings = loopback_settings(tmp_path, 18085, unique_name()).model_copy(
        update={"mdns_loopback": False}
    )

    async def scenario() -> Discovery:
        async with running(settings) as discovery:
            await discovery.wait_ready(5)
            return discovery

    discovery = run(scenario())
    assert discovery._zc is None and discovery.host_name is None


# -- two real daemons --------------------------------------------------------------------------

ABSENT_CATALOG = """
[[models]]
id = "absent"
path = "absent.gguf"
"""


def test_two_real_daemons_become_name_and_name_2(tmp_path: Path) -> None:
    """Two `thoxd serve` processes; no model (their catalog names a file that is not there)."""
    name = unique_name()
    catalog = tmp_path / "models.toml"
    catalog.write_text(ABSENT_CATALOG)
    args = ("--catalog", str(catalog), "--default-model", "absent")
    args += ("--hostname", name, "--mdns-loopback", "true")
    thox = f"{name}.{SERVICE_TYPES[0]}"
    thox2 = f"{name}-2.{SERVICE_TYPES[0]}"
    daemons: list[Daemon] = []

    async def scenario() -> None:
        async with loopback_browser() as browser:
            daemons.append(Daemon(tmp_path, tmp_path / "models", *args))
            await browser.wait_for(lambda: thox in browser.present, timeout=LIMIT - 1)
            daemons.append(Daemon(tmp_path, tmp_path / "models", *args))
            await browser.wait_for(lambda: thox2 in browser.present, timeout=LIMIT - 1)
            for daemon, instance in zip(daemons, (thox, thox2), strict=True):
                info = await browser.resolve(SERVICE_TYPES[0], instance)
                assert info.port == daemon.port
            # SIGTERM: the goodbyes withdraw the service before the process exits.
            assert await asyncio.to_thread(daemons[1].stop) == 0
            await browser.wait_for(lambda: thox2 in browser.removed, timeout=2)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 2 * LIMIT))
    finally:
        for daemon in daemons:
            if daemon.proc.poll() is None:
                daemon.stop()
    assert f"this box is {name}-2.local" in daemons[1].log()
