"""What splitting a model over llama.cpp RPC servers costs against running it on one box.

One thoxd on loopback serves Gemma 3 270M four ways, from one catalog: whole on this box; all
layers on one rpc-server; the layers over two rpc-servers; half here and half on one rpc-server.
The rpc-servers are llama.cpp's own (scripts/build-rpc), on loopback ports, so this measures the
protocol's cost per step (a round trip and the activations per layer boundary each token, the
weights sent once at load), not a network. On one 2-core machine every process shares the same
cores: a split cannot be faster here, and is not meant to be anywhere: it is for memory.
Greedy, `--tokens` per request, `--reps` requests per way after a warm-up, ways alternating;
first with the split in the daemon's own process (`rpc_isolate = false`), then as served by
default, from a process of its own (thoxd/fleet/split.py), to see what that relay costs.
Usage: bench/rpc_split.py [--tokens 128] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from concurrency import Server, free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gemma-3-270m-q4_k_m.gguf"


def catalog(ports: list[int], ways: list[str]) -> str:
    one, two = f'"127.0.0.1:{ports[0]}"', f'"127.0.0.1:{ports[1]}"'
    extras = {"one-box": "", "rpc-all": f"rpc = [{one}]", "rpc-two": f"rpc = [{one}, {two}]",
              "rpc-half": f"rpc = [{one}]\nn_gpu_layers = 9"}  # fmt: skip
    return "".join(
        f'[[models]]\nid = "{name}"\npath = "{MODEL}"\nn_ctx = 2048\n{extras[name]}\n\n'
        for name in ways
    )


def once(url: str, model: str, tokens: int, k: int) -> tuple[float, float]:
    """TTFT (ms) and decode tok/s of one streamed, greedy completion."""
    body = {"model": model, "prompt": f"Item {k}: 1, 2, 3, 4, 5,", "max_tokens": tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}  # fmt: skip
    sent = time.perf_counter()
    stamps = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    return (stamps[0] - sent) * 1000, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def phase(
    args: argparse.Namespace, ports: list[int], ways: list[str], isolate: bool
) -> dict[str, list[tuple[float, float]]]:
    """One daemon serving `ways`; each way measured `--reps` times after a warm-up, in turn."""
    with tempfile.TemporaryDirectory(prefix="thoxd-rpc-") as tmp:
        (Path(tmp) / "models.toml").write_text(catalog(ports, ways))
        port = free_port()
        cmd = [sys.executable, "-m", "thoxd", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--models-dir", str(args.models_dir), "--state-dir", tmp, "--catalog",
               f"{tmp}/models.toml", "--default-model", "one-box", "--threads", str(args.threads),
               "--slots", "1", "--mdns", "false", "--draft-max", "0", "--log-level", "warning",
               "--rpc-isolate", str(isolate).lower()]  # fmt: skip
        server = Server("thoxd", cmd, port, Path(tmp) / "thoxd.log")
        results: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
        try:
            server.wait_ready()
            for k in range(args.reps + 1):
                for way in ways:
                    measured = once(server.url, way, args.tokens, k)
                    if k:  # the first round loads each model (and sends the weights over)
                        results[way].append(measured)
        finally:
            server.stop()
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models-dir", type=Path, default=Path.home() / ".cache/thoxd-test")
    args = p.parse_args()
    binary = ROOT / "build/rpc/bin/rpc-server"
    if not binary.exists():
        sys.exit("run scripts/build-rpc first")
    ports = [free_port(), free_port()]
    helpers = [
        subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port), "-t", str(args.threads)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in ports
    ]  # fmt: skip
    try:
        # The split itself, in the daemon's process (an rpc-server serves one process at a
        # time, so the ways sharing one cannot each have a process of their own) ...
        results = phase(args, ports, ["one-box", "rpc-all", "rpc-two", "rpc-half"], False)
        # ... then as served by default: the split model in a process of its own, relayed.
        own = phase(args, ports, ["one-box", "rpc-all"], True)
        results["rpc-all, own process"] = own["rpc-all"]
        results["one-box (2nd daemon)"] = own["one-box"]
    finally:
        for helper in helpers:
            helper.terminate()
    base = statistics.median(r[1] for r in results["one-box"])
    print("| way | TTFT ms | decode tok/s | vs one box |")
    print("| - | - | - | - |")
    for way, runs in results.items():
        ttft = statistics.median(r[0] for r in runs)
        rate = statistics.median(r[1] for r in runs)
        print(f"| {way} | {ttft:.0f} | {rate:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
