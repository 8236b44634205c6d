"""thoxd/engine/llama.py's device registry: the ctypes bindings to ggml's, on the real library."""

from __future__ import annotations

from thoxd.engine.llama import devices, gpu_devices, supports_gpu_offload


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
