"""ggml's devices as llama.cpp registered them: the CPU, the GPUs a GPU build offloads layers to
(and their memory), an RPC server's device's memory, and whether this build's CPU kernels may
be handed repacked weights. ctypes on the libggml llama-cpp-python loaded, like thoxd.engine.llama.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import llama_cpp


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


@dataclass(frozen=True)
class Device:
    """A device in ggml's registry, and its memory in bytes as its backend reports them."""

    name: str
    description: str
    kind: int  # ggml_backend_dev_type: CPU 0, GPU 1, integrated GPU 2, accelerator 3
    free: int
    total: int

    @property
    def is_gpu(self) -> bool:
        return self.kind in (1, 2)


def devices() -> list[Device]:
    """Every device this llama.cpp build registered: the CPU, and its GPUs (CUDA, Metal,
    Vulkan...), which are where llama.cpp puts offloaded layers when a model names no devices.
    RPC servers' devices are never in the registry (thoxd/engine/rpc.py)."""
    ggml = _ggml()
    found = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = device_memory(dev)
        found.append(
            Device(
                name=(ggml.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                description=(ggml.ggml_backend_dev_description(dev) or b"").decode(
                    errors="replace"
                ),
                kind=ggml.ggml_backend_dev_type(dev),
                free=free,
                total=total,
            )
        )
    return found


def device_memory(dev: int) -> tuple[int, int]:
    """A ggml device's free and total bytes, as its backend reports them (an RPC server's:
    asked over its connection)."""
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    _ggml().ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


def gpu_devices() -> list[Device]:
    """The GPUs layers can be offloaded to; none on a CPU build."""
    return [d for d in devices() if d.is_gpu] if supports_gpu_offload() else []


@functools.cache
def repacks_safely() -> bool:
    """Whether llama.cpp may repack weights into its extra buffer types. Not in a build with
    AMX kernels (a native build on a Xeon with AMX_INT8): their matrix multiply crashes the
    process on any step of more than one row (measured with Gemma 3 Q4_K_M; llama.cpp issue
    20824), so there weights stay in plain CPU buffers, as llama-server's --no-repack keeps them."""
    cpu = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    return not cpu.ggml_cpu_has_amx_int8()


@functools.cache
def _ggml() -> ctypes.CDLL:
    """libggml as llama-cpp-python loaded it (the same soname binds to the same copy)."""
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so"))
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, fn).restype = ctypes.c_char_p
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_memory.restype = None
    lib.ggml_backend_dev_memory.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    return lib
