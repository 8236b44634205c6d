"""The memory estimate's split between host and an offload device, against what llama.cpp
allocates. No GPU needed: an `rpc-server` on loopback (scripts/build-rpc) is a device llama.cpp
places layers on by the same rule as a GPU (llama_model::load_tensors: n_gpu_layers from the
output layer back), with each offloaded layer's K and V and a compute buffer beside them.

For each n_gpu_layers: Gemma 3 270M loaded by thoxd's LoadedModel onto the server's device, the
"buffer size" lines llama.cpp logs summed by device, beside `estimate_memory(gpu_layers=n)`'s
bytes on the device and in host memory. Usage: bench/offload_estimate.py [--layers 1,4,10,19]
"""

from __future__ import annotations

import argparse
import logging
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from thoxd.catalog.entries import ModelSpec  # noqa: E402
from thoxd.catalog.gguf import check_gguf  # noqa: E402
from thoxd.engine.embed import EMBED_BATCH  # noqa: E402
from thoxd.engine.llama import backend_init, route_llama_logs  # noqa: E402
from thoxd.engine.memory import estimate_memory  # noqa: E402
from thoxd.engine.model import EngineConfig, LoadedModel  # noqa: E402
from thoxd.engine.rpc import RpcBackend  # noqa: E402

MIB = 1 << 20
BUFFER = re.compile(
    r"(\S+?)(?:\[[^\]]*\])?\s+(model|KV|compute|output) buffer size\s*=\s*([\d.]+) MiB"
)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--layers", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 10, 19]
    )
    p.add_argument("--models-dir", type=Path, default=Path.home() / ".cache/thoxd-test")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--slots", type=int, default=4)
    args = p.parse_args()
    build = ROOT / "build" / "rpc"
    port = free_port()
    server = subprocess.Popen(
        [str(build / "bin" / "rpc-server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        return measure(args, build, f"127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(10)


def measure(args: argparse.Namespace, build: Path, endpoint: str) -> int:
    backend_init()
    route_llama_logs()
    lines = Lines()
    logging.getLogger("thoxd.llama").addHandler(lines)
    logging.getLogger("thoxd.llama").setLevel(logging.DEBUG)
    devices = RpcBackend(build / "lib" / "libggml-rpc.so").devices([endpoint])
    path = args.models_dir / "gemma-3-270m-q4_k_m.gguf"
    info = check_gguf(path, root=args.models_dir)
    config = EngineConfig(
        models_dir=args.models_dir, threads=2, slots=args.slots, queue_size=4, batch_size=256,
        draft_max=15,
    )  # fmt: skip
    print(
        "| n_gpu_layers | device: logged model / KV / compute MiB | device: logged total / "
        "estimated MiB | host: logged total / estimated MiB |"
    )
    print("| - | - | - | - |")
    for layers in args.layers:
        spec = ModelSpec.model_validate(
            {"id": "g", "path": path.name, "n_ctx": args.n_ctx, "n_gpu_layers": layers,
             "capabilities": ["completion"]}
        )  # fmt: skip
        estimate = estimate_memory(
            info, n_ctx=args.n_ctx, slots=args.slots, outputs=config.max_outputs,
            batch_size=config.batches(offloaded=False)[1], embeddings=False,
            embed_batch=EMBED_BATCH, gpu_layers=layers,
        )  # fmt: skip
        lines.lines.clear()  # this load's lines only
        model = LoadedModel(spec, path, config, memory=None, devices=devices)
        model.close()
        device: dict[str, float] = {}
        host = 0.0
        for line in lines.lines:
            match = BUFFER.search(line)
            if not match:
                continue
            name, kind, mib = match[1], match[2], float(match[3])
            if name.startswith("RPC"):
                device[kind] = device.get(kind, 0.0) + mib
            else:
                host += mib
        parked = args.n_ctx * (estimate.kv_cache // ((args.slots + 1) * args.n_ctx)) / MIB
        print(
            f"| {layers} | {device.get('model', 0):.1f} / {device.get('KV', 0):.1f} / "
            f"{device.get('compute', 0):.1f} | {sum(device.values()):.1f} / "
            f"{estimate.gpu / MIB:.1f} | {host:.1f} / {estimate.host / MIB - parked:.1f} |"
        )
    print(
        "\nhost's estimate is shown without the parked n_ctx (host memory llama.cpp does not "
        "allocate at load)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
