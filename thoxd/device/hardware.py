"""The readers behind /system/info: psutil, /proc, llama.cpp, NVML or nvidia-smi.

Each returns plain JSON values and may raise; `thoxd.device.info.Readers` turns a failure into null.
They may take milliseconds (open files, sensors) or a process start (nvidia-smi): the sampler
calls them on its own thread, never a request.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import importlib.metadata
import io
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psutil  # type: ignore[import-untyped]

from thoxd import __version__

T = TypeVar("T")
MiB = 1 << 20


class Read(Protocol):
    def __call__(self, name: str, fn: Callable[[], T]) -> T | None: ...


def static_info(r: Read) -> dict[str, Any]:
    """What does not change while the daemon runs: read once."""
    return {
        "os": r("os", _os_name),
        "kernel": r("kernel", platform.release) or None,
        "arch": r("arch", platform.machine) or None,
        "boot_time": r("boot_time", psutil.boot_time),
        "cpu_model": r("cpu_model", _cpu_model),
        "physical_cores": r("cpu_count", lambda: psutil.cpu_count(logical=False)),
        "logical_cores": r("cpu_count", lambda: psutil.cpu_count(logical=True)),
        "runtime": {
            "thoxd_version": __version__,
            "python_version": platform.python_version(),
            "llama_cpp_python_version": r(
                "llama_version", lambda: importlib.metadata.version("llama-cpp-python")
            ),
            "llama_cpp_system_info": r("llama_info", _llama_system_info),
            "llama_cpp_features": r("llama_info", lambda: llama_features(_llama_system_info())),
            "gpu_offload": r("llama_gpu", _llama_gpu_offload),
        },
    }


def _os_name() -> str:
    with contextlib.suppress(OSError):
        release = platform.freedesktop_os_release()
        if release.get("PRETTY_NAME"):
            return release["PRETTY_NAME"]
    return f"{platform.system()} {platform.release()}".strip()


def _cpu_model() -> str | None:
    if sys.platform.startswith("linux"):
        keys = ("model name", "Model", "Hardware", "cpu model", "Processor")
        found: dict[str, str] = {}
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in keys and value.strip() and key not in found:
                    found[key] = value.strip()
        for key in keys:
            if key in found:
                return found[key]
    return platform.processor() or None


def _llama_system_info() -> str:
    from thoxd.engine import system_info

    return system_info().strip()


def _llama_gpu_offload() -> bool:
    from thoxd.engine import supports_gpu_offload

    return supports_gpu_offload()


def llama_features(info: str) -> list[str]:
    """llama.cpp's "CPU : SSE3 = 1 | AVX2 = 1 | ..." as the names that are on: ["AVX2", ...]."""
    on = []
    for part in info.replace("\n", "|").split("|"):
        name, sep, value = part.rpartition("=")
        name = name.rpartition(":")[2].strip()
        if sep and name and value.strip() not in ("", "0") and name not in on:
            on.append(name)
    return on


def cpu_freq() -> dict[str, float | None] | None:
    freq = psutil.cpu_freq()
    if freq is None:
        return None
    return {k: round(float(getattr(freq, k)), 1) or None for k in ("current", "min", "max")}


def memory() -> dict[str, Any]:
    m = psutil.virtual_memory()
    return {
        "total_bytes": m.total,
        "available_bytes": m.available,
        "used_bytes": m.total - m.available,
        "percent": m.percent,
    }


def swap() -> dict[str, Any]:
    s = psutil.swap_memory()
    return {
        "total_bytes": s.total,
        "used_bytes": s.used,
        "free_bytes": s.free,
        "percent": s.percent,
    }


def disk(path: Path) -> dict[str, Any]:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the models dir may not exist yet: its file system does
    d = psutil.disk_usage(str(existing))
    return {
        "of": "models_dir",
        "total_bytes": d.total,
        "used_bytes": d.used,
        "free_bytes": d.free,
        "percent": d.percent,
    }


def temperatures() -> dict[str, list[dict[str, Any]]] | None:
    if not hasattr(psutil, "sensors_temperatures"):
        return None
    readings = psutil.sensors_temperatures()
    out = {
        chip: [
            {"label": t.label or None, "current": t.current, "high": t.high, "critical": t.critical}
            for t in entries
        ]
        for chip, entries in readings.items()
        if entries
    }
    return out or None


def fans() -> dict[str, list[dict[str, Any]]] | None:
    if not hasattr(psutil, "sensors_fans"):
        return None
    out = {
        chip: [{"label": f.label or None, "current": f.current} for f in entries]
        for chip, entries in psutil.sensors_fans().items()
        if entries
    }
    return out or None


def battery() -> dict[str, Any] | None:
    if not hasattr(psutil, "sensors_battery"):
        return None
    b = psutil.sensors_battery()
    if b is None:
        return None
    secs = b.secsleft
    known = isinstance(secs, int) and secs >= 0
    return {
        "battery_percent": round(b.percent, 1),
        "plugged_in": b.power_plugged,
        "seconds_left": secs if known else None,
    }


def network() -> list[dict[str, Any]]:
    stats = psutil.net_if_stats()
    families = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
    nics = []
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        stat = stats.get(name)
        nics.append(
            {
                "name": name,
                "is_up": bool(stat.isup) if stat else None,
                "speed_mbps": (stat.speed or None) if stat else None,
                "mtu": stat.mtu if stat else None,
                "addresses": [
                    {"family": families[a.family], "address": a.address, "netmask": a.netmask}
                    for a in addrs
                    if a.family in families
                ],
            }
        )
    return nics


def process(proc: Any) -> dict[str, Any]:
    with proc.oneshot():
        info: dict[str, Any] = {
            "pid": proc.pid,
            "rss_bytes": proc.memory_info().rss,
            "cpu_percent": proc.cpu_percent(),
            "threads": proc.num_threads(),
            "started_at": proc.create_time(),
        }
    info["open_files"] = len(proc.open_files())
    with contextlib.suppress(Exception):
        info["open_fds"] = proc.num_fds()
    return info


def read_gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs through NVML when its Python binding is installed, else nvidia-smi; [] when
    neither is there."""
    with contextlib.suppress(ImportError):
        return _nvml_gpus(importlib.import_module("pynvml"))
    if shutil.which("nvidia-smi") is None:
        return []
    return parse_nvidia_smi(_nvidia_smi())


_SMI_FIELDS = "index,name,memory.total,memory.used,utilization.gpu,temperature.gpu,power.draw"


def _nvidia_smi() -> str:
    done = subprocess.run(
        ["nvidia-smi", f"--query-gpu={_SMI_FIELDS}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=3,
        check=True,
    )
    return done.stdout


def parse_nvidia_smi(text: str) -> list[dict[str, Any]]:
    def number(value: str) -> float | None:
        try:
            return float(value)
        except ValueError:  # "[N/A]", "[Not Supported]"
            return None

    gpus = []
    for row in csv.reader(io.StringIO(text), skipinitialspace=True):
        if len(row) < 7:
            continue
        total, used = number(row[2]), number(row[3])
        gpus.append(
            {
                "index": int(row[0]),
                "name": row[1].strip(),
                "memory_total_bytes": int(total * MiB) if total is not None else None,
                "memory_used_bytes": int(used * MiB) if used is not None else None,
                "utilization_percent": number(row[4]),
                "temperature_c": number(row[5]),
                "power_w": number(row[6]),
            }
        )
    return gpus


def _nvml_gpus(nvml: Any) -> list[dict[str, Any]]:
    def maybe(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:  # not supported on this GPU
            return None

    nvml.nvmlInit()
    try:
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            name = nvml.nvmlDeviceGetName(h)
            power = maybe(nvml.nvmlDeviceGetPowerUsage, h)
            util = maybe(nvml.nvmlDeviceGetUtilizationRates, h)
            gpus.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_total_bytes": int(mem.total),
                    "memory_used_bytes": int(mem.used),
                    "utilization_percent": float(util.gpu) if util is not None else None,
                    "temperature_c": maybe(nvml.nvmlDeviceGetTemperature, h, 0),
                    "power_w": power / 1000.0 if power is not None else None,
                }
            )
        return gpus
    finally:
        nvml.nvmlShutdown()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
