"""thoxd/device/interfaces.py: where mDNS speaks, and which addresses it gives out. No network."""

from __future__ import annotations

import asyncio
import ipaddress

from thoxd.device.interfaces import Nic, Plan, listen_addresses, local_nics, plan_advertisement

LO = Nic("lo", 1, True, True, False, ("127.0.0.1",), ("::1",))
ETH = Nic("eth0", 2, True, False, True, ("192.168.1.5",), ("fd00::5", "fe80::1"))
DOCKER = Nic("docker0", 3, True, False, True, ("172.17.0.1",))
DOWN = Nic("wlan0", 4, False, False, True, ("10.0.0.9",))
ANY4 = [ipaddress.ip_address("0.0.0.0")]
ANY46 = [ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")]
LOOP4 = [ipaddress.ip_address("127.0.0.1")]


def test_plan_is_lan_interfaces_only_by_default() -> None:
    plan = plan_advertisement(ANY4, [LO, ETH, DOCKER, DOWN])
    assert plan == Plan(("eth0",), ("192.168.1.5",), ("192.168.1.5",))
    assert not plan.ipv6


def test_plan_advertises_ipv6_only_when_the_api_listens_there() -> None:
    plan = plan_advertisement(ANY46, [LO, ETH])
    assert isinstance(plan, Plan)
    assert plan.addresses == ("192.168.1.5", "fd00::5")  # no link-local: useless without scope
    assert plan.interfaces == ("192.168.1.5", 2)
    assert plan.ipv6


def test_plan_for_one_bound_address() -> None:
    plan = plan_advertisement([ipaddress.ip_address("192.168.1.5")], [LO, ETH])
    assert isinstance(plan, Plan) and plan.addresses == ("192.168.1.5",)


def test_plan_loopback_only_when_asked_or_alone() -> None:
    assert "loopback only" in str(plan_advertisement(LOOP4, [LO, ETH]))
    asked = plan_advertisement(LOOP4, [LO, ETH], loopback=True)
    assert isinstance(asked, Plan) and asked.addresses == ("127.0.0.1",)
    alone = plan_advertisement(ANY4, [LO])
    assert isinstance(alone, Plan) and alone.nics == ("lo",)
    both = plan_advertisement(ANY4, [LO, ETH], loopback=True)
    assert isinstance(both, Plan) and both.addresses == ("192.168.1.5", "127.0.0.1")


def test_plan_named_interfaces_by_name_or_address() -> None:
    by_name = plan_advertisement(ANY4, [LO, ETH, DOCKER], interfaces=["docker0"])
    assert isinstance(by_name, Plan) and by_name.nics == ("docker0",)
    by_address = plan_advertisement(ANY4, [LO, ETH], interfaces=["127.0.0.1"])
    assert isinstance(by_address, Plan) and by_address.addresses == ("127.0.0.1",)
    assert isinstance(plan_advertisement(ANY4, [LO, ETH], interfaces=["wlan9"]), str)


def test_listen_addresses() -> None:
    assert asyncio.run(listen_addresses("::")) == (
        ipaddress.ip_address("0.0.0.0"),
        ipaddress.ip_address("::"),
    )
    assert asyncio.run(listen_addresses("127.0.0.1")) == (ipaddress.ip_address("127.0.0.1"),)
    assert ipaddress.ip_address("127.0.0.1") in asyncio.run(listen_addresses("localhost"))


def test_local_nics_finds_loopback() -> None:
    lo = [n for n in local_nics() if n.loopback]
    assert lo and "127.0.0.1" in lo[0].ipv4 and lo[0].up
