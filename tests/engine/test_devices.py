"""thoxd/engine/devices.py: ggml's device registry (the ctypes bindings to it) and whether
weights may be repacked, on the real library."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.conftest import GEMMA
from thoxd.engine.devices import devices, gpu_devices, repacks_safely, supports_gpu_offload
from thoxd.engine.llama import LlamaModel, route_llama_logs, system_info


def test_the_registry_lists_the_cpu_with_its_memory() -> None:
    found = devices()
    cpus = [d for d in found if d.kind == 0]
    assert len(cpus) == 1 and cpus[0].name == "CPU"
    assert cpus[0].total > 0 and 0 < cpus[0].free <= cpus[0].total
    assert not cpus[0].is_gpu


def test_gpu_devices_are_the_registrys_gpus_when_llama_cpp_can_offload() -> None:
    names = [d.name for d in gpu_devices()]
    if supports_gpu_offload():
        assert names == [d.name for d in devices() if d.is_gpu] and names
    else:
        assert names == []


def test_a_build_with_amx_kernels_is_recognised() -> None:
    assert repacks_safely() == ("AMX_INT8 = 1" not in system_info())


def test_weights_never_go_to_amx_buffers(shelf: Path, caplog: pytest.LogCaptureFixture) -> None:
    # llama.cpp's AMX matrix multiply crashes on a step of two rows or more (a native build on a
    # Xeon with AMX): every test that decodes a batch would die with it. Elsewhere the weights
    # may be repacked for the CPU's own kernels.
    caplog.set_level(logging.DEBUG, logger="thoxd.llama")
    route_llama_logs()
    LlamaModel(shelf / GEMMA).close()
    buffers = [r.getMessage() for r in caplog.records if "model buffer size" in r.getMessage()]
    assert buffers and not any("AMX" in line for line in buffers)
