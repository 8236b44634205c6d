"""The device as /system/info shows it: a psutil snapshot kept fresh by a background sampler.

psutil's CPU percentages compare two moments, and some readers (open files, sensors, nvidia-smi)
take milliseconds to tens of milliseconds, so no request ever reads them itself: a daemon thread
samples everything every `interval` seconds, and a request only copies the latest snapshot and
adds what is cheap and live (uptime, the engine's models, request counters, the mDNS name).

Every reader is guarded: one that fails or is not supported on this machine gives null (sensors,
battery: null when absent; GPUs: an empty list), never an error. Paths are never reported.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psutil  # type: ignore[import-untyped]

from thoxd.device import hardware as hw

logger = logging.getLogger("thoxd.system")

T = TypeVar("T")
_GPU_EVERY = 5  # nvidia-smi is a process start: every 5th sample (10 s) is enough


class Identity(Protocol):
    """What /system/info shows of mDNS (thoxd.device.discovery.Discovery)."""

    @property
    def host_name(self) -> str | None: ...  # "thox.local", "thox-2.local"; None until claimed

    @property
    def install_id(self) -> str: ...


class Readers:
    """Runs each reader guarded: a failure is logged once (debug) and reads as None."""

    def __init__(self) -> None:
        self._failed: set[str] = set()

    def read(self, name: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except Exception as exc:
            if name not in self._failed:
                self._failed.add(name)
                logger.debug("system info: %s cannot be read: %r", name, exc)
            return None


class SystemSampler:
    """Keeps `snapshot()` fresh from a daemon thread; `start()` and `stop()` are idempotent."""

    def __init__(self, disk_path: Path, interval: float = 2.0) -> None:
        self.disk_path = disk_path
        self.interval = interval
        self.readers = Readers()
        self._snapshot: dict[str, Any] | None = None
        self._static: dict[str, Any] | None = None
        self._gpus: list[dict[str, Any]] = []
        self._rounds = 0
        self._process: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._prime()
            self._thread = threading.Thread(target=self._run, name="thoxd-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)

    def snapshot(self) -> dict[str, Any] | None:
        return self._snapshot

    def _prime(self) -> None:
        """psutil's CPU percentages measure from the previous call: make the first one."""
        self.readers.read("cpu", lambda: psutil.cpu_percent(percpu=True))
        self.readers.read("cpu", lambda: psutil.cpu_percent())
        self.readers.read("process", lambda: self._proc().cpu_percent())

    def _run(self) -> None:
        self._stop.wait(0.25)  # a first interval for the CPU percentages to cover
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # pragma: no cover - every reader is guarded already
                logger.exception("system sampler failed")
            self._stop.wait(self.interval)

    def _proc(self) -> Any:
        if self._process is None:
            self._process = psutil.Process()
        return self._process

    # -- one sample --------------------------------------------------------------------------

    def sample(self) -> dict[str, Any]:
        """Reads everything once (seconds of CPU work at most: call it off the event loop)."""
        r = self.readers.read
        if self._static is None:
            self._static = hw.static_info(self.readers.read)
        if self._rounds % _GPU_EVERY == 0:
            self._gpus = r("gpus", hw.read_gpus) or []
        self._rounds += 1
        snapshot = {
            "static": self._static,
            "cpu": {
                "usage_percent": r("cpu", lambda: psutil.cpu_percent()),
                "per_core_percent": r("cpu", lambda: psutil.cpu_percent(percpu=True)),
                "frequency_mhz": r("cpu_freq", hw.cpu_freq),
                "load_average": r("loadavg", hw.load_average),
            },
            "memory": r("memory", hw.memory),
            "swap": r("swap", hw.swap),
            "disk": r("disk", lambda: hw.disk(self.disk_path)),
            "sensors": {
                "temperatures_c": r("temperatures", hw.temperatures),
                "fans_rpm": r("fans", hw.fans),
            },
            "gpus": self._gpus,
            "power": r("battery", hw.battery),
            "network": r("network", hw.network),
            "process": r("process", lambda: hw.process(self._proc())),
            "sampled_at": time.time(),
        }
        self._snapshot = snapshot
        return snapshot


# -- the document -------------------------------------------------------------------------------


def info_document(
    snapshot: dict[str, Any],
    *,
    identity: Identity | None,
    models: list[dict[str, Any]],
    requests: dict[str, Any] | None,
    readers: Readers,
) -> dict[str, Any]:
    """/system/info from the latest snapshot plus the live parts (see README, "Device info")."""
    static = snapshot["static"]
    now = time.time()
    mdns_name = readers.read("mdns", lambda: identity.host_name) if identity else None
    boot = static["boot_time"]
    process = snapshot["process"]
    if process is not None:
        started = process.get("started_at", now)
        process = {k: v for k, v in process.items() if k != "started_at"}
        process["uptime_seconds"] = round(now - started, 1)
    return {
        "device": {
            "hostname": mdns_name.removesuffix(".local") if mdns_name else None,
            "mdns_name": mdns_name,
            "system_hostname": readers.read("hostname", socket.gethostname),
            "install_id": readers.read("install_id", lambda: identity.install_id)
            if identity
            else None,
            "uptime_seconds": round(now - boot, 1) if boot is not None else None,
            "os": static["os"],
            "kernel": static["kernel"],
            "arch": static["arch"],
        },
        "cpu": {
            "model": static["cpu_model"],
            "physical_cores": static["physical_cores"],
            "logical_cores": static["logical_cores"],
            **snapshot["cpu"],
        },
        "memory": snapshot["memory"],
        "swap": snapshot["swap"],
        "disk": snapshot["disk"],
        "sensors": snapshot["sensors"],
        "gpus": snapshot["gpus"],
        "power": snapshot["power"],
        "network": snapshot["network"],
        "process": process,
        "runtime": static["runtime"],
        "models": models,
        "requests": requests,
        "sampled_at": round(snapshot["sampled_at"], 3),
    }
