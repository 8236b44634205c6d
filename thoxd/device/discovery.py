"""mDNS / DNS-SD: the box answers as `thox.local` and advertises `_thox._tcp` and `_http._tcp`.

python-zeroconf (its asyncio API, on the daemon's event loop) owns the sockets, answers queries,
announces and sends the goodbyes. It probes only *service instance* names, so the claim of the
host name is ours, done before anything is announced (RFC 6762 §8.1):

    for label in thox, thox-2, thox-3, ...:
        wait 0-250 ms, then send 3 probes 250 ms apart: ANY questions for `label.local.` and for
        the two service instance names, our proposed A/AAAA and SRV records in the authority
        section; listen until 250 ms after the last probe.
        nobody answered            -> the name is ours: register both services, announce
        somebody answered          -> taken: log it, try the next label

An answer counts no matter which addresses it carries: a second thoxd on this very machine answers
with our own addresses and must still push us to `thox-2`. The one exception is the machine's own
name (`thox` on a box whose OS host name is `thox`): when the system's responder (Avahi) answers for
it with this machine's addresses only, the name already points here, and we share it.

Probes are QM questions, not QU: a unicast reply to port 5353 reaches only one of the sockets that
share that port on a host, which may not be ours; multicast replies reach every responder. The
three probes differ in question order because zeroconf drops a byte-identical packet seen within
the last second.

Where, and which addresses: thoxd/device/interfaces.py (LAN interfaces, the addresses the API
listens on). Not handled: interfaces that change after start (the addresses are those seen at
start); two daemons that probe for one name within the same second (neither answers before it has
registered, and there is no §8.2 tie-break), and conflicts that appear after registration (§9).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

# The DNS* classes are exported by zeroconf (for compatibility) but not listed in its __all__.
from zeroconf import (  # type: ignore[attr-defined]
    DNSAddress,
    DNSOutgoing,
    DNSQuestion,
    DNSRecord,
    DNSService,
    IPVersion,
    RecordUpdate,
    RecordUpdateListener,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from thoxd.device.install_id import load_install_id
from thoxd.device.interfaces import Plan, listen_addresses, local_nics, plan_advertisement
from thoxd.settings import Settings

logger = logging.getLogger("thoxd.discovery")

SERVICE_TYPES = ("_thox._tcp.local.", "_http._tcp.local.")
TXT_LIMIT = 200
MAX_LABELS = 20  # thox, thox-2, ... thox-20; then give up
PROBES = 3
PROBE_INTERVAL = 0.25  # s
HOST_TTL = 120  # s, RFC 6762 §10

# DNS numbers (RFC 1035, 2782, 3596, 6762 §10.2)
_TYPE_A, _TYPE_AAAA, _TYPE_SRV, _TYPE_ANY = 1, 28, 33, 255
_CLASS_IN, _CLASS_UNIQUE = 1, 0x8000
_FLAGS_QUERY = 0

State = Literal["idle", "off", "probing", "registered", "failed", "stopped"]


def txt_record(install_id: str, auth: str = "none") -> bytes:
    """The TXT rdata, `txtvers` first: what a client needs to talk to the box, nothing else."""
    entries = {
        "txtvers": "1",
        "path": "/v1",
        "api": "openai",
        "ws": "/v1/stream",
        "auth": auth,
        "id": install_id,
    }
    strings = [f"{key}={value}".encode("ascii") for key, value in entries.items()]
    data = b"".join(bytes([len(s)]) + s for s in strings)
    if len(data) > TXT_LIMIT:
        raise ValueError(f"TXT record of {len(data)} bytes is over {TXT_LIMIT}")
    return data


def candidate_labels(base: str, count: int = MAX_LABELS) -> Iterator[str]:
    """thox, thox-2, thox-3, ...: every one a DNS label of at most 63 bytes."""
    yield base
    for n in range(2, count + 1):
        suffix = f"-{n}"
        yield base[: 63 - len(suffix)] + suffix


@dataclass
class ProbeResult:
    host_addresses: set[str]  # addresses others gave for label.local
    instance_taken: bool  # somebody answered for label._thox._tcp or label._http._tcp


class _Watch(RecordUpdateListener):
    """Collects the answers for the names being probed."""

    def __init__(self, host: str, instances: Iterable[str]) -> None:
        self.host = host.lower()
        self.instances = {name.lower() for name in instances}
        self.result = ProbeResult(set(), False)

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        for update in records:
            record = update.new
            if record.is_expired(now):  # a goodbye: that holder is leaving
                continue
            if record.key == self.host and isinstance(record, DNSAddress):
                self.result.host_addresses.add(str(ipaddress.ip_address(record.address)))
            elif record.key in self.instances:
                self.result.instance_taken = True

    @property
    def answered(self) -> bool:
        return bool(self.result.host_addresses) or self.result.instance_taken


async def probe(zc: Zeroconf, label: str, addresses: Sequence[str], port: int) -> ProbeResult:
    """RFC 6762 §8.1 probing for `label.local.` and `label.<type>` of each service type."""
    host = f"{label}.local."
    instances = [f"{label}.{type_}" for type_ in SERVICE_TYPES]
    questions = [DNSQuestion(name, _TYPE_ANY, _CLASS_IN) for name in (host, *instances)]
    proposed: list[DNSRecord] = [
        DNSAddress(
            host,
            _TYPE_AAAA if ":" in a else _TYPE_A,
            _CLASS_IN | _CLASS_UNIQUE,
            HOST_TTL,
            ipaddress.ip_address(a).packed,
        )
        for a in addresses
    ]
    proposed += [
        DNSService(name, _TYPE_SRV, _CLASS_IN | _CLASS_UNIQUE, HOST_TTL, 0, 0, port, host)
        for name in instances
    ]
    watch = _Watch(host, instances)
    zc.async_add_listener(watch, questions)  # also replays what the cache already knows
    try:
        await asyncio.sleep(random.uniform(0, 0.25))  # RFC 6762 §8.1 jitter
        for i in range(PROBES):
            if watch.answered:
                break
            out = DNSOutgoing(_FLAGS_QUERY)
            for question in questions[i:] + questions[:i]:
                out.add_question(question)
            # The authority section makes it a probe (answered at once). The typed method takes
            # pointers only; the list it fills is written record by record, whatever the type.
            cast("list[DNSRecord]", out.authorities).extend(proposed)
            zc.async_send(out)
            await asyncio.sleep(PROBE_INTERVAL)
    finally:
        zc.async_remove_listener(watch)
    return watch.result


def is_conflict(
    label: str, result: ProbeResult, own_addresses: set[str], system_label: str
) -> bool:
    """Whether the probe answers mean that another responder holds the name."""
    if result.instance_taken:
        return True
    if not result.host_addresses:
        return False
    # The system's own responder naming this machine, with this machine's addresses.
    same_machine = result.host_addresses <= own_addresses
    return not (same_machine and label.lower() == system_label.lower())


class Discovery:
    """The daemon's mDNS presence. `start()` returns at once; probing and registering run in a
    task on the event loop; `stop()` sends the goodbyes. What others read:

    - `host_name`: the claimed name, "thox.local" or "thox-2.local"; None until claimed, and when
      mDNS is off or failed
    - `label`: "thox" / "thox-2", the host label and the service instance name
    - `install_id`: this installation's random id (also with mDNS off)
    - `state`: idle, off, probing, registered, failed, stopped
    - `addresses`, `interfaces`: what `host_name` resolves to, and where it is advertised
    - `await wait_ready()`: until registration is done (or off, or failed): True when registered
    """

    def __init__(
        self, settings: Settings, *, auth: str | None = None, system_label: str | None = None
    ) -> None:
        self._settings = settings
        # What a client must bring (TXT `auth`): a key once the owner has turned keys on.
        self._auth = auth or ("key" if settings.owner_key is not None else "none")
        self._system_label = system_label or socket.gethostname().split(".")[0]
        self._install_id: str | None = None
        self.state: State = "idle"
        self.label: str | None = None
        self.addresses: tuple[str, ...] = ()
        self.interfaces: tuple[str, ...] = ()
        self.service_names: tuple[str, ...] = ()
        self._zc: AsyncZeroconf | None = None
        self._task: asyncio.Task[None] | None = None
        self._announcing: list[asyncio.Future[Any]] = []
        self._ready = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None

    @property
    def install_id(self) -> str:
        if self._install_id is None:
            self._install_id = load_install_id(self._settings.state_dir)
        return self._install_id

    @property
    def zeroconf(self) -> Zeroconf | None:
        """The zeroconf instance once registered (the fleet browses for peers on it)."""
        return self._zc.zeroconf if self._zc is not None and self.state == "registered" else None

    @property
    def host_name(self) -> str | None:
        return f"{self.label}.local" if self.state == "registered" and self.label else None

    async def start(self) -> None:
        if self.state != "idle":
            return
        _ = self.install_id  # made (or read) now, not at the first /system/info
        if not self._settings.mdns:
            self._off("mdns = false")
            return
        self.state = "probing"
        self._task = asyncio.create_task(self._run(), name="thoxd-mdns")

    async def wait_ready(self, timeout: float | None = None) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self.state == "registered"

    async def stop(self) -> None:
        """Goodbye packets for what was announced, then the sockets close. Safe to call twice."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for announcing in self._announcing:
            announcing.cancel()
        if self._zc is not None:
            try:
                await self._zc.async_close()  # unregisters everything: goodbyes, TTL 0
            except Exception as exc:  # the daemon is stopping anyway; say why, go on
                logger.warning("mDNS: closing failed: %s", exc)
            else:
                if self.state == "registered":
                    logger.info("mDNS: %s withdrawn", self.host_name)
        self.state = "stopped"
        self._ready.set()

    def _off(self, why: str) -> None:
        logger.info("mDNS off: %s", why)
        self.state = "off"
        self._ready.set()

    async def _run(self) -> None:
        settings = self._settings
        try:
            listen = await listen_addresses(settings.host)
            nics = await asyncio.to_thread(local_nics)
            plan = plan_advertisement(
                listen, nics, interfaces=settings.mdns_interfaces, loopback=settings.mdns_loopback
            )
            if isinstance(plan, str):
                self._off(plan)
                return
            version = IPVersion.All if plan.ipv6 else IPVersion.V4Only
            self._zc = AsyncZeroconf(interfaces=list(plan.interfaces), ip_version=version)
            zc = self._zc.zeroconf
            await zc.async_wait_for_start()
            own = {a for n in nics for a in (*n.ipv4, *n.ipv6)}
            label = await self._claim(zc, plan, own)
            if label is None:
                logger.error(
                    "mDNS: %s.local and the next %d names are all taken; not advertising",
                    settings.hostname,
                    MAX_LABELS - 1,
                )
                self.state = "failed"
                return
            txt = txt_record(self.install_id, self._auth)
            for type_ in SERVICE_TYPES:
                info = AsyncServiceInfo(
                    type_,
                    f"{label}.{type_}",
                    port=settings.port,
                    properties=txt,
                    server=f"{label}.local.",
                    host_ttl=HOST_TTL,
                    parsed_addresses=list(plan.addresses),
                )
                # Our probe covered the instance names; zeroconf's own would add 1.7 s.
                announced = await self._zc.async_register_service(info, cooperating_responders=True)
                self._announcing.append(asyncio.ensure_future(announced))
                self.service_names += (info.name,)
            self.label, self.addresses, self.interfaces = label, plan.addresses, plan.nics
            self.state = "registered"
            logger.info(
                "mDNS: advertising %s (%s) on %s: _thox._tcp and _http._tcp, port %d",
                self.host_name,
                ", ".join(plan.addresses),
                ", ".join(plan.nics),
                settings.port,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # mDNS is a convenience: the API serves without it
            logger.warning("mDNS failed, not advertising: %s", exc, exc_info=exc)
            self.state = "failed"
        finally:
            self._ready.set()

    async def _claim(self, zc: Zeroconf, plan: Plan, own: set[str]) -> str | None:
        for label in candidate_labels(self._settings.hostname):
            result = await probe(zc, label, plan.addresses, self._settings.port)
            if not is_conflict(label, result, own, self._system_label):
                if result.host_addresses:
                    logger.info("mDNS: %s.local is also this machine's own name; sharing it", label)
                if label != self._settings.hostname:
                    logger.warning(
                        "mDNS: %s.local is taken on the network; this box is %s.local",
                        self._settings.hostname,
                        label,
                    )
                return label
            holder = ", ".join(sorted(result.host_addresses)) or "a service of that name"
            logger.info("mDNS: %s.local is taken (answered by %s)", label, holder)
        return None
