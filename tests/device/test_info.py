"""thoxd/device/info.py and thoxd/device/hardware.py: /system/info, in-process and on the real
daemon."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from tests.conftest import Daemon
from tests.inproc import make_app, request
from thoxd.api.system import SystemRoutes
from thoxd.catalog.entries import Catalog, ModelSpec
from thoxd.device import hardware
from thoxd.device.info import Readers, SystemSampler
from thoxd.engine.runtime import Engine, EngineConfig

TOP_KEYS = {
    "device", "cpu", "memory", "swap", "disk", "sensors", "gpus", "power", "network",
    "process", "runtime", "models", "requests", "sampled_at",
}  # fmt: skip
DEVICE_KEYS = {
    "hostname", "mdns_name", "system_hostname", "install_id", "uptime_seconds", "os", "kernel",
    "arch",
}  # fmt: skip
CPU_KEYS = {
    "model", "physical_cores", "logical_cores", "usage_percent", "per_core_percent",
    "frequency_mhz", "load_average",
}  # fmt: skip
MODEL_KEYS = {"id", "state", "memory_bytes", "n_ctx", "slots", "slots_busy", "queue_depth"}


def info(app: Starlette) -> dict[str, Any]:
    try:
        response = asyncio.run(request(app, "GET", "/system/info"))
    finally:
        app.state.sampler.stop()
    assert response.status_code == 200, response.text
    data = response.json()
    assert isinstance(data, dict)
    return data


def test_info_document(tmp_path: Path, catalog: Catalog) -> None:
    data = info(make_app(tmp_path, catalog))
    assert set(data) == TOP_KEYS
    assert set(data["device"]) == DEVICE_KEYS
    assert set(data["cpu"]) == CPU_KEYS
    device = data["device"]
    assert device["mdns_name"] is None  # mDNS is off in this app
    assert len(device["install_id"]) == 16
    assert device["uptime_seconds"] > 0
    assert data["cpu"]["logical_cores"] >= 1
    assert data["memory"]["total_bytes"] > 0
    assert data["disk"]["of"] == "models_dir" and data["disk"]["free_bytes"] > 0
    assert isinstance(data["gpus"], list)
    assert any(nic["name"] for nic in data["network"])
    assert data["process"]["rss_bytes"] > 0 and data["process"]["threads"] >= 1
    runtime = data["runtime"]
    assert runtime["llama_cpp_python_version"] == "0.3.36"
    assert isinstance(runtime["gpu_offload"], bool)
    assert isinstance(runtime["llama_cpp_features"], list)
    models = {m["id"]: m for m in data["models"]}
    assert list(models) == [spec.id for spec in catalog]
    model = models[catalog.get("thox-coder").id]
    assert set(model) == MODEL_KEYS
    assert model["state"] == "unloaded"
    assert model["n_ctx"] == 8192 and model["slots_busy"] is None
    assert set(data["requests"]) == {"total", "in_flight", "by_status"}
    assert data["requests"]["in_flight"] == 1  # this one
    # No paths: not the state dir, not the models dir.
    assert str(tmp_path) not in json.dumps(data)


def test_unreadable_fields_are_null(
    tmp_path: Path, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise PermissionError("no /proc for you")

    for name in ("virtual_memory", "swap_memory", "disk_usage", "net_if_addrs", "cpu_freq"):
        monkeypatch.setattr(hardware.psutil, name, broken)
    monkeypatch.setattr(hardware.os, "getloadavg", broken)
    monkeypatch.setattr(hardware, "_cpu_model", broken)
    data = info(make_app(tmp_path, catalog))
    assert data["memory"] is None and data["swap"] is None and data["disk"] is None
    assert data["network"] is None and data["cpu"]["frequency_mhz"] is None
    assert data["cpu"]["load_average"] is None and data["cpu"]["model"] is None
    assert data["device"]["os"]  # the rest is still there


def test_identity_from_discovery(tmp_path: Path, catalog: Catalog) -> None:
    class Claimed:
        host_name = "thox-2.local"
        install_id = "0123456789abcdef"

    config = EngineConfig(tmp_path, threads=1, slots=1, queue_size=1, batch_size=32)
    sampler = SystemSampler(tmp_path)
    routes = SystemRoutes(
        Engine(catalog, config), "thox-coder", sampler=sampler, identity=Claimed()
    ).routes()
    try:
        response = asyncio.run(request(Starlette(routes=routes), "GET", "/system/info"))
    finally:
        sampler.stop()
    device = response.json()["device"]
    assert device["hostname"] == "thox-2"
    assert device["mdns_name"] == "thox-2.local"
    assert device["install_id"] == "0123456789abcdef"
    assert response.json()["requests"] is None  # no metrics here


def test_sampler_refreshes_in_the_background(tmp_path: Path) -> None:
    sampler = SystemSampler(tmp_path, interval=0.05)
    sampler.start()
    try:
        deadline = time.monotonic() + 5
        while sampler.snapshot() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        first = sampler.snapshot()
        assert first is not None
        while (latest := sampler.snapshot()) is first:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert latest is not None and latest["sampled_at"] > first["sampled_at"]
    finally:
        sampler.stop()


def test_readers_turn_errors_into_none() -> None:
    readers = Readers()

    def fails() -> int:
        raise OSError("gone")

    assert readers.read("x", fails) is None
    assert readers.read("x", lambda: 3) == 3


def test_llama_features() -> None:
    text = "CPU : SSE3 = 1 | AVX = 1 | AVX512 = 0 | LLAMAFILE = 1 | OPENMP = 1 |"
    assert hardware.llama_features(text) == ["SSE3", "AVX", "LLAMAFILE", "OPENMP"]


def test_nvidia_smi_parsing() -> None:
    text = (
        "0, NVIDIA H100 80GB HBM3, 81559, 1024, 12, 34, 71.50\n"
        "1, Tesla T4, 15360, [N/A], 0, 40, [N/A]\n"
    )
    gpus = hardware.parse_nvidia_smi(text)
    assert gpus[0] == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total_bytes": 81559 << 20,
        "memory_used_bytes": 1024 << 20,
        "utilization_percent": 12.0,
        "temperature_c": 34.0,
        "power_w": 71.5,
    }
    assert gpus[1]["memory_used_bytes"] is None and gpus[1]["power_w"] is None


def test_no_gpu_tools_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_module(name: str) -> object:
        raise ImportError(name)

    monkeypatch.setattr(hardware.importlib, "import_module", no_module)
    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    assert hardware.read_gpus() == []


# -- the real daemon -------------------------------------------------------------------------


def test_info_on_the_daemon(daemon: Daemon, default_spec: ModelSpec) -> None:
    with httpx.Client(base_url=daemon.url) as http:
        response = http.get("/system/info")
    assert response.status_code == 200
    data = response.json()
    assert set(data) == TOP_KEYS
    [model] = [m for m in data["models"] if m["id"] == default_spec.id]
    assert model["state"] == "loaded" and model["slots"] == 2
    assert model["memory_bytes"] > 100 << 20  # its weights and KV cache
    assert model["slots_busy"] == 0 and model["queue_depth"] == 0
    assert data["cpu"]["usage_percent"] is not None
    assert data["requests"]["total"] >= 1
    assert data["process"]["open_files"] >= 1


def test_info_answers_while_a_generation_runs(daemon: Daemon, default_spec: ModelSpec) -> None:
    # /system/info reads a snapshot and the engine's counters: it never waits for a decode step.
    body = {"model": "thox-coder", "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 200,
            "temperature": 0, "repeat_penalty": 1.0, "stream": True}  # fmt: skip
    with (
        httpx.Client(base_url=daemon.url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as stream,
    ):
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))  # it runs
        info = http.get("/system/info")  # a second connection, meanwhile
        rest = [line for line in lines if line.startswith("data: ")]
    assert info.status_code == 200
    [model] = [m for m in info.json()["models"] if m["id"] == default_spec.id]
    assert model["slots_busy"] == 1  # answered while the generation held its slot
    assert rest[-1] == "data: [DONE]"
    finish = json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
    assert finish == "length"  # it ran to its end after the answer: nothing was cut short
    daemon.wait_idle()
