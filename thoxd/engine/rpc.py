"""llama.cpp's RPC backend (ggml-rpc): a model's layers offloaded to `rpc-server` processes on
other boxes, for a model too big for one box's memory. llama.cpp computes the layers where their
weights are, passing activations over TCP each step; nothing of it is ours.

The llama-cpp-python wheel is built without it, so `scripts/build-rpc` builds libggml-rpc.so
from the same llama.cpp source; loaded into this process it binds to the libggml-base.so that
llama-cpp-python already loaded (same soname), and registers each server's devices, which the
model's parameters then name (`devices`, NULL-terminated) as where its offloaded layers go.
"""

from __future__ import annotations

import ctypes
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

import llama_cpp

LIBRARY = "libggml-rpc.so"


class RpcUnavailable(RuntimeError):
    """No RPC backend here (scripts/build-rpc was not run), or a server did not answer."""


class RpcBackend:
    """The RPC library, loaded once per process; servers registered once each."""

    def __init__(self, library: Path) -> None:
        if not library.is_file():
            raise RpcUnavailable(f"{LIBRARY} was not built (scripts/build-rpc)")
        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        # The base library first, by the very path llama-cpp-python loaded it from.
        self._base = ctypes.CDLL(str(lib_dir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        self._rpc = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
        self._rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
        self._rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
        self._base.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
        self._base.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
        self._base.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
        self._base.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._lock = threading.Lock()
        self._devices: dict[str, list[int]] = {}

    def devices(self, endpoints: Sequence[str]) -> list[int]:
        """The devices of every server in `endpoints` (HOST:PORT), in order. A server not yet
        registered is reached over TCP first: llama.cpp aborts the whole process when one does
        not answer. A registered one is not: this process holds its one connection (a server
        serves one client at a time, and would leave a probe waiting in its backlog)."""
        found: list[int] = []
        with self._lock:
            for endpoint in endpoints:
                if endpoint not in self._devices:
                    reachable(endpoint)
                    reg = self._rpc.ggml_backend_rpc_add_server(endpoint.encode())
                    count = self._base.ggml_backend_reg_dev_count(reg) if reg else 0
                    if not count:
                        raise RpcUnavailable(f"the RPC server at {endpoint} has no device")
                    self._devices[endpoint] = [
                        self._base.ggml_backend_reg_dev_get(reg, i) for i in range(count)
                    ]
                found += self._devices[endpoint]
        return found


def reachable(endpoint: str, timeout: float = 2.0) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError:
        raise RpcUnavailable(f"the RPC server at {endpoint} does not answer") from None
